"""The benchmarks: every kernel, layout and mesh side by side, the ring's balance, training.

    python experiments/bench.py [--quick] [--part single,mesh,linear,balance,train]
                                [--out out/bench] [--repeats N] [--figures] [--tables]
    python experiments/bench.py --part decode [--quick] [--out out/bench]
    python experiments/bench.py --part sparse [--quick] [--out out/bench]
    python experiments/bench.py --part efficiency [--quick] [--out out/bench]
    python experiments/bench.py --part device [--quick] [--out out/bench]

Parts: `single`, `mesh`, `linear` (the suite, `lca/bench/suite.py`), `balance`
(the ring's critical path per layout, `lca/bench/balance.py`), `train`
(training tokens per second and the longest context that fits,
`lca/bench/train.py`); default all of these, on the CPU. `decode` (only when
named, alone or with others: about 5 minutes) measures per-token decode
latency with the KV cache against recomputing the forward, on one device and
sharded over a mesh against an all-gathered cache, and prefill per strategy
(`lca/bench/decode.py`; bench_decode.csv and bench_decode.png). `sparse`
(only when named, like `decode`: about 4 minutes) measures hash-bucketed and
key-dropping attention (fwd+bwd) and HyperAttention (fwd) against dense
attention on one device, with each row's difference from dense
(`lca/bench/sparse.py`; bench_sparse.csv and bench_sparse.png). `efficiency`
(only when named: about 8 minutes) measures the default local kernel's
fraction of the matmul peak, forward+backward on one device, from 2k to 64k
tokens at three tiles (`lca/bench/efficiency.py`; bench_efficiency.csv and
bench_efficiency.png). `device` (run alone, on
the machine's accelerator: `lca/bench/device.py`) measures lca's TPU/GPU kernel
beside blockwise and cuDNN/XLA attention; without an accelerator it says so and
exits 0. One-device points run in this process,
which has one device; mesh points in a subprocess with --devices emulated
devices (`lca/bench/figures.py`). Prints one row per point (median and
min-max spread, ratio to the part's baseline, fraction of the matmul peak
measured in the run, compiled memory, max relative error against the float64
reference), then the key figures; writes bench_suite.csv, bench_balance.csv,
bench_train.csv and bench_<part>.png to --out. A rerun into the same --out
checks FLOPs and memory are identical and says which medians left the
previous run's spread. --figures writes into docs/figures, runs the figure
producers (cost model, layout diagram), then rewrites every result table in
README.md and docs/ from the data (`tools/tables.py`); `experiments/figures.py`
is the same. --tables only rewrites the tables.
"""

import argparse
import dataclasses
import importlib
import os
import time

import jax

PARTS = ("single", "mesh", "linear", "balance", "train")
DECODE_PART = "decode"
NAMED = (DECODE_PART, "sparse", "efficiency")  # not in the default set: run when named
DEVICE_PART = "device"


def main(argv=None, figures=False):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid: minutes on a laptop")
    parser.add_argument("--part", "--parts", dest="parts", default=",".join(PARTS),
                        help="comma list of " + str(PARTS + NAMED)
                        + ", or device alone")
    parser.add_argument("--out", default=None, help="default out/bench (docs/figures with"
                        " --figures)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per point")
    parser.add_argument("--devices", type=int, default=8, help="emulated CPU devices of the mesh")
    parser.add_argument("--figures", action="store_true", default=figures,
                        help="write into docs/figures, run every figure producer, then rewrite"
                        " the README's and docs/' tables from the data")
    parser.add_argument("--tables", action="store_true",
                        help="only rewrite the README's and docs/' tables from docs/figures")
    args = parser.parse_args(argv)
    if DEVICE_PART in args.parts.split(","):
        if args.parts != DEVICE_PART:
            parser.error("run --part device alone: the other parts run on the CPU")
        from lca.bench import device  # noqa: PLC0415

        device.run(args.out or "out/bench", quick=args.quick, repeats=args.repeats or 5)
        return
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 1)  # mesh points run in their own process
    from lca.bench import figures as figures_lib  # noqa: PLC0415 -- after the device count
    from lca.bench import suite  # noqa: PLC0415

    tables = figures_lib.load_module("tools/tables.py")
    if args.tables:
        print("\n".join(tables.update_docs(tables.FIGURES_DIR)))
        return
    parts = tuple(args.parts.split(","))
    unknown = sorted(set(parts) - set(PARTS) - set(NAMED))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; parts: {list(PARTS + NAMED)}")
    grid = suite.QUICK if args.quick else suite.DEFAULT
    grid = dataclasses.replace(grid, repeats=args.repeats or grid.repeats,
                               mesh_devices=min(grid.mesh_devices, args.devices),
                               mesh_sizes=tuple(m for m in grid.mesh_sizes if m <= args.devices))
    out = args.out or ("docs/figures" if args.figures else "out/bench")
    start = time.time()
    for name in NAMED:  # each its own module of lca.bench, run in this process
        if name in parts:
            extra = {"devices": args.devices} if name == DECODE_PART else {}
            importlib.import_module(f"lca.bench.{name}").run(
                out, quick=args.quick, repeats=args.repeats, **extra)
    parts = tuple(p for p in parts if p not in NAMED)
    if parts:
        figures_lib.run(out, grid, parts, quick=args.quick,
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
