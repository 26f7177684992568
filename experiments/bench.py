"""The benchmark suite: every kernel and layout, forward and forward+backward, peers side by side.

    python experiments/bench.py [--quick] [--parts single,mesh,linear] [--out out/bench]
                                [--repeats N] [--figures]

Parts and columns: see `lca/bench/suite.py`. Prints one row per point
(median and min-max spread, ratio to the part's baseline, fraction of the
matmul peak measured in the run, compiled temporary memory, max relative
error against the float64 reference), then the key figures; writes
bench_suite.csv and bench_<part>.png to --out. Run it twice into the same
--out and the second run checks FLOPs and memory are identical and says which
medians fall outside the first run's spread. --figures writes into
docs/figures, also runs every other figure producer
(`lca.bench.figures.PRODUCERS`), then rewrites every result table in
README.md and docs/ from the data (`lca.bench.tables`); `experiments/figures.py`
is the same. --tables only rewrites the tables.
"""

import argparse
import dataclasses
import os
import time

import jax

PARTS = ("single", "mesh", "linear")


def main(argv=None, figures=False):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid: minutes on a laptop")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list of " + str(PARTS))
    parser.add_argument("--out", default=None, help="default out/bench (docs/figures with"
                        " --figures)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per point")
    parser.add_argument("--devices", type=int, default=8, help="emulated CPU devices")
    parser.add_argument("--figures", action="store_true", default=figures,
                        help="write into docs/figures, run every figure producer, then rewrite"
                        " the README's and docs/' tables from the data")
    parser.add_argument("--tables", action="store_true",
                        help="only rewrite the README's and docs/' tables from docs/figures")
    args = parser.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    from lca.bench import figures as figures_lib  # noqa: PLC0415 -- after the device count
    from lca.bench import suite, tables  # noqa: PLC0415

    if args.tables:
        print("\n".join(tables.update_docs(tables.FIGURES_DIR)))
        return
    parts = tuple(args.parts.split(","))
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; parts: {list(PARTS)}")
    grid = suite.QUICK if args.quick else suite.DEFAULT
    grid = dataclasses.replace(grid, repeats=args.repeats or grid.repeats,
                               mesh_devices=min(grid.mesh_devices, args.devices),
                               mesh_sizes=tuple(m for m in grid.mesh_sizes if m <= args.devices))
    out = args.out or ("docs/figures" if args.figures else "out/bench")
    start = time.time()
    figures_lib.run_suite(out, grid, parts,
                          grid_name="quick" if args.quick else "default")
    if args.figures:
        figures_lib.run_producers(out, quick=args.quick)
        if os.path.abspath(out) == os.path.abspath(tables.FIGURES_DIR):
            print("\n".join(tables.update_docs(out)))
        else:
            print(f"tables not rewritten: README and docs/ quote {tables.FIGURES_DIR}, not {out}")
    print(f"wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
