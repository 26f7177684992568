"""Runs benchmark parts, each in a process with the devices it needs, into one folder.

    python experiments/bench.py [--quick] [--part single,mesh,...] [--out DIR] [--figures]

One-device work (the `single` part, linear on one device, `balance`) runs in
the calling process, which has one CPU device, as a user calling
`lca.attention` has; mesh work (`mesh`, sequence-parallel linear, `train`)
runs in one subprocess with the grid's emulated devices. The matmul peak is
measured in the one-device process at the start and the end; every suite
row's fraction of it is computed from the faster. Rows go to one CSV per
file in `FILES`; a part not run keeps its previous rows, and a rerun of a
part is compared with its previous rows (`summary.compare`).

A producer is a function `f(out_dir)` (optionally `f(out_dir, quick=False)`)
that writes figures from no measurement of its own; list it in `PRODUCERS`
(one line) by file path and function name.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import time

from lca.bench import balance, plots, records, suite, summary, timing, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = suite.PARTS + ("balance", "train")
FILES = {"single": "bench_suite.csv", "mesh": "bench_suite.csv", "linear": "bench_suite.csv",
         "balance": "bench_balance.csv", "train": "bench_train.csv"}
PART_OF = {"train": "train", "context": "train"}  # row part -> the part that writes it

# (what it writes, file relative to the repository root, function taking out_dir[, quick])
PRODUCERS = [
    ("communication cost model", "tools/cost_report.py", "write_plots"),
    ("ring steps per layout", "tools/layout_diagram.py", "write_layout_steps"),
]


def load_module(path):
    """The module in the file at `path` (relative to the repository root), or None.

    Package modules (lca/...) are imported; other files (tools/...) are loaded
    once by path under their own name, their folder on sys.path, so sibling
    files import each other as the command line does.
    """
    full = os.path.join(REPO, path)
    if not os.path.exists(full):
        return None
    relative = os.path.relpath(full, REPO)
    if relative.startswith("lca" + os.sep):
        return importlib.import_module(os.path.splitext(relative)[0].replace(os.sep, "."))
    folder, name = os.path.split(os.path.splitext(full)[0])
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def run_producers(out_dir, producers=None, *, quick=False):
    """Calls every producer with out_dir (and quick=True where asked and it takes it);
    returns one line per producer saying what happened."""
    notes = []
    for what, path, function in PRODUCERS if producers is None else producers:
        module = load_module(path)
        fn = None if module is None else getattr(module, function, None)
        if fn is None:
            notes.append(f"skipped {what}: {path} has no {function}() yet")
            print(notes[-1], flush=True)
            continue
        start = time.time()
        fn(out_dir, **({"quick": True} if quick and "quick" in
                       inspect.signature(fn).parameters else {}))
        notes.append(f"wrote {what}: {path}:{function}({out_dir!r}) in {time.time() - start:.0f} s")
        print(notes[-1], flush=True)
    return notes


def run_here(parts, grid, quick, devices, progress=True):
    """The Points of `parts` that a process with `devices` devices measures."""
    rows = []
    if any(p in suite.PARTS for p in parts):
        rows += suite.run(grid, [p for p in parts if p in suite.PARTS], devices=devices,
                          progress=progress)
    if "balance" in parts and devices == 1:
        rows += balance.run(**(balance.QUICK if quick else balance.DEFAULT), progress=progress)
    if "train" in parts and devices == grid.mesh_devices:
        rows += train.run(quick)
    return rows


def _needs_mesh(parts, grid):
    mesh_specs = [s for s in suite.specs(grid, [p for p in parts if p in suite.PARTS],
                                         _kernels()) if s.devices(grid) > 1]
    return bool(mesh_specs) or "train" in parts


def _kernels():
    from lca.bench import kernels  # noqa: PLC0415

    return kernels.default_kernels()


def _in_mesh_process(parts, grid, quick):
    """run_here in a subprocess with the grid's emulated devices; its Points."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.csv")
        subprocess.run([sys.executable, "-m", "lca.bench.figures", path, str(grid.mesh_devices),
                        str(grid.repeats), ",".join(parts), "quick" if quick else "default"],
                       check=True, env=dict(os.environ, PYTHONPATH=REPO))
        return records.read_points(path)


def run(out_dir, grid, parts, *, quick=False, grid_name="custom"):
    """Measures `parts` into out_dir: CSVs (with the run's matmul peak), suite plots."""
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    peak = timing.matmul_peak_flops()
    rows = run_here(parts, grid, quick, devices=1)
    if _needs_mesh(parts, grid):
        rows += _in_mesh_process(parts, grid, quick)
    peak = max(peak, timing.matmul_peak_flops())
    for p in rows:
        if p.part in suite.PARTS and p.seconds is not None:
            p.peak_fraction = p.flops / p.seconds / peak
    print(f"matmul peak (2048x2048 float32, one-device process, fastest at the start and end):"
          f" {peak / 1e9:.1f} GFLOP/s")
    extra = {"matmul_peak_gflops": peak / 1e9, "grid": grid_name,
             "finished": time.strftime("%Y-%m-%d")}
    for name in sorted(set(FILES[p] for p in parts)):
        path = os.path.join(out_dir, name)
        mine = [p for p in rows if FILES[PART_OF.get(p.part, p.part)] == name]
        previous = records.read_points(path) if os.path.exists(path) else []
        extras = records.read_extras(path) if previous else []
        ran = {PART_OF.get(p.part, p.part) for p in mine}
        before = [p for p in previous if PART_OF.get(p.part, p.part) in ran]
        if before:
            print(summary.compare(before, mine))
        kept = [(p, e) for p, e in zip(previous, extras)
                if PART_OF.get(p.part, p.part) not in ran]  # with their own run's metadata
        records.write_csv(path, [p for p, _ in kept] + mine,
                          [e for _, e in kept] + [extra] * len(mine))
        print(f"wrote {path}")
    print(records.format_points(rows))
    print(summary.key_figures(rows))
    suite_rows = records.read_points(os.path.join(out_dir, FILES["single"])) if any(
        FILES[p] == FILES["single"] for p in parts) else []
    for written in plots.write_plots(suite_rows, out_dir):
        print(f"wrote {written}")
    print(f"measured in {time.time() - start:.0f} s")
    return rows


if __name__ == "__main__":  # the mesh process of `run`
    out, devices, repeats, parts, grid_name = sys.argv[1:]
    import dataclasses

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(devices))
    grid = dataclasses.replace(suite.QUICK if grid_name == "quick" else suite.DEFAULT,
                               repeats=int(repeats), mesh_devices=int(devices))
    grid = dataclasses.replace(grid, mesh_sizes=tuple(m for m in grid.mesh_sizes
                                                      if m <= int(devices)))
    records.write_csv(out, run_here(parts.split(","), grid, grid_name == "quick", int(devices)))
