"""The training benchmark's driver: runs `lca.bench.train` measurements and prints tables."""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from lca.bench import train as bench
from lca.parallel import make_mesh
from lca.train import config_files, from_config

LAYOUT = {"xla": "contiguous", "blockwise": "contiguous", "ring": "zigzag",
          "allgather": "zigzag", "linear": "zigzag"}


def _batch_for(mesh) -> int:
    shape = dict(mesh.shape)
    return shape.get("data", 1) * shape.get("fsdp", 1)


def run(config: str, *, seq_len: int, speed_mesh: dict, speed_kernels, steps: int,
        memory_kernels, budget_gib: float, out: str) -> dict:
    exp = from_config(config_files.load(config))
    report = {"config": config, "seq_len": seq_len, "speed_mesh": speed_mesh,
              "budget_gib": budget_gib, "model": dataclasses.asdict(exp.model), "speed": {},
              "memory": {}}
    if speed_kernels:
        mesh = make_mesh(speed_mesh, jax.devices()[:_prod(speed_mesh)])
        print(f"speed: T={seq_len}, mesh {speed_mesh}, batch {_batch_for(mesh)},"
              f" {steps} timed steps after one warm-up", flush=True)
        for kernel in speed_kernels:
            e = bench.with_kernel(exp, kernel, LAYOUT[kernel], seq_len)
            e = dataclasses.replace(e, train=dataclasses.replace(e.train,
                                                                 batch_size=_batch_for(mesh)))
            r = bench.tokens_per_second(e, mesh, steps=steps)
            report["speed"][kernel] = r
            print(f"  {kernel:>9s}: {r['tokens_per_s']:10,.0f} tokens/s  step {r['step_s']:.2f} s"
                  f"  (first step {r['first_step_s']:.1f} s)", flush=True)
        a, b = speed_kernels[0], speed_kernels[-1]
        if a != b:
            ratio = report["speed"][a]["tokens_per_s"] / report["speed"][b]["tokens_per_s"]
            report["speed"]["ratio"] = ratio
            print(f"  {a} / {b} tokens per second: {ratio:.2f}x", flush=True)
    if memory_kernels:
        mesh = make_mesh(dict(exp.mesh_sizes(len(jax.devices()))))
        budget = int(budget_gib * 2**30)
        granule = 1024
        print(f"memory: longest context whose train step fits {budget_gib:g} GiB per device,"
              f" mesh {dict(mesh.shape)}, batch {_batch_for(mesh)} (one sequence per data"
              f" replica), granule {granule}", flush=True)
        for kernel in memory_kernels:
            e = bench.with_kernel(exp, kernel, LAYOUT[kernel], granule)
            e = dataclasses.replace(e, train=dataclasses.replace(e.train,
                                                                 batch_size=_batch_for(mesh)))
            print(f" {kernel} ({LAYOUT[kernel]}):", flush=True)
            length, used, probed = bench.longest_context(
                e, mesh, budget, granule=granule, start=4096, limit=1 << 26, log=print)
            report["memory"][kernel] = {"longest": length, "bytes": used,
                                        "probed": {str(k): v for k, v in probed.items()}}
        print("longest context in budget:")
        for kernel, r in report["memory"].items():
            used = "" if r["bytes"] is None else f"  ({r['bytes'] / 2**30:.2f} GiB per device)"
            print(f"  {kernel:>9s}: {r['longest']:>10,d} tokens{used}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "bench_train.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    return report


def write_figures(out_dir, quick=False):
    """Figure producer: bench_train.json into out_dir, as `experiments/bench_train.py` does.

    quick: the speed comparison at T=4096 and no longest-context search.
    """
    return run("configs/passkey.py", seq_len=4096 if quick else 16384,
               speed_mesh={"sequence": 8}, speed_kernels=["ring", "xla"], steps=3,
               memory_kernels=[] if quick else ["xla", "blockwise", "ring", "linear"],
               budget_gib=20.0, out=out_dir)


def _prod(axes: dict) -> int:
    n = 1
    for v in axes.values():
        n *= v
    return n
