"""Regenerate every benchmark figure and table: the suite, every producer, then the tables.

    python experiments/figures.py [--quick]        # into docs/figures, then README/docs tables
    python experiments/bench.py [--quick] [--out DIR]

A producer is a function `f(out_dir)` (optionally `f(out_dir, quick=False)`)
that writes figures or data files; list it in `PRODUCERS` (one line) by file
path and function name. A producer whose file or function does not exist is
skipped with a printed note. The Markdown tables are then rendered from the
data files by `lca.bench.tables`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import time

from lca.bench import plots, records, suite, summary

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSV_NAME = "bench_suite.csv"

# (what it writes, file relative to the repository root, function taking out_dir[, quick])
PRODUCERS = [
    ("communication cost model", "tools/cost_model.py", "write_plots"),
    ("ring steps per layout", "lca/bench/diagrams.py", "write_layout_steps"),
    ("cost model against measurement", "lca/bench/validation.py", "write_validation"),
    ("training speed and longest context", "lca/bench/train_report.py", "write_figures"),
]


def load_module(path):
    """The module in the file at `path` (relative to the repository root), or None.

    Package modules (lca/...) are imported; other files (tools/...) are loaded
    once by path and registered in sys.modules, where dataclasses look them up.
    """
    full = os.path.join(REPO, path)
    if not os.path.exists(full):
        return None
    relative = os.path.relpath(full, REPO)
    if relative.startswith("lca" + os.sep):
        return importlib.import_module(os.path.splitext(relative)[0].replace(os.sep, "."))
    name = "repo_" + os.path.splitext(relative)[0].replace(os.sep, "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, full)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_file(path, function):
    """`function` of the file at `path` (relative to the repository root), or None."""
    module = load_module(path)
    return None if module is None else getattr(module, function, None)


def run_producers(out_dir, producers=None, *, quick=False):
    """Calls every producer with out_dir (and quick=True where asked and it takes it);
    returns one line per producer saying what happened."""
    notes = []
    for what, path, function in PRODUCERS if producers is None else producers:
        fn = load_file(path, function)
        if fn is None:
            notes.append(f"skipped {what}: {path} has no {function}() yet")
            continue
        start = time.time()
        if quick and "quick" in inspect.signature(fn).parameters:
            fn(out_dir, quick=True)
        else:
            fn(out_dir)
        notes.append(f"wrote {what}: {path}:{function}({out_dir!r}) in {time.time() - start:.0f} s")
        print(notes[-1], flush=True)
    return notes


def run_suite(out_dir, grid, parts, *, progress=True, kernels=None, grid_name="custom"):
    """Runs the suite into out_dir (CSV after every group, then plots); returns the points.

    When out_dir already holds a suite CSV, the new run is compared with it:
    FLOPs, bytes and memory must match exactly, times should fall in the spread.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CSV_NAME)
    previous = records.read_points(path) if os.path.exists(path) else None

    def save(rows, peak):
        records.write_csv(path, rows, {"matmul_peak_gflops": peak / 1e9, "grid": grid_name,
                                       "finished": time.strftime("%Y-%m-%d")})

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
