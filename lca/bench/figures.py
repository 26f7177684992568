"""Regenerate every benchmark figure and table: the suite's CSV and plots, then every producer.

    python experiments/figures.py [--quick]        # into docs/figures
    python experiments/bench.py [--quick] [--out DIR]

A producer is a function `f(out_dir)` that writes figures; list it in
`PRODUCERS` (one line) by file path and function name. A producer whose
file or function does not exist yet is skipped with a printed note.
"""

from __future__ import annotations

import importlib.util
import os

from lca.bench import plots, records, suite, summary

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSV_NAME = "bench_suite.csv"

# (what it draws, file relative to the repository root, function taking out_dir)
PRODUCERS = [
    ("communication cost model", "tools/cost_model.py", "write_plots"),
    ("ring steps per layout", "lca/bench/diagrams.py", "write_layout_steps"),
]


def _load(path, function):
    full = os.path.join(REPO, path)
    if not os.path.exists(full):
        return None
    name = "figure_producer_" + os.path.splitext(path)[0].replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function, None)


def run_producers(out_dir, producers=None):
    """Calls every producer with out_dir; returns one line per producer saying what happened."""
    notes = []
    for what, path, function in PRODUCERS if producers is None else producers:
        fn = _load(path, function)
        if fn is None:
            notes.append(f"skipped {what}: {path} has no {function}() yet")
            continue
        fn(out_dir)
        notes.append(f"wrote {what}: {path}:{function}({out_dir!r})")
    return notes


def run_suite(out_dir, grid, parts, *, progress=True, kernels=None):
    """Runs the suite into out_dir (CSV after every group, then plots); returns the points.

    When out_dir already holds a suite CSV, the new run is compared with it:
    FLOPs, bytes and memory must match exactly, times should fall in the spread.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CSV_NAME)
    previous = records.read_points(path) if os.path.exists(path) else None

    def save(rows, peak):
        records.write_csv(path, rows, {"matmul_peak_gflops": peak / 1e9})

    points, peak = suite.run(grid, parts, progress=progress, kernels=kernels, on_group=save)
    save(points, peak)
    print(f"matmul peak (2048x2048 float32, fastest at the start and end of this run):"
          f" {peak / 1e9:.1f} GFLOP/s")
    print(records.format_points(points))
    print(summary.key_figures(points))
    if previous is not None:
        print(summary.compare(previous, points))
    for written in plots.write_plots(points, out_dir):
        print(f"wrote {written}")
    print(f"wrote {path}")
    return points
