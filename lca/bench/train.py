"""Training-step benchmarks of a configured model: tokens per second, and context that fits.

    python experiments/bench.py --part train [--quick]

Both change only the attention kernel, its layout and the sequence length of
the config's model, so kernels are compared on the same model and batch:

- speed (`part="train"`): the median wall time of the jitted train step on
  real arrays, after one warm-up step, for the registry's default strategy
  against its one-device baseline, on a (sequence=n) mesh.
- memory (`part="context"`): the longest length (a multiple of a granule of
  1/64 of it) whose compiled train step fits a per-device budget, by
  doubling then bisection, for every kernel the model can name that the
  suite measures; bytes from `compiled.memory_analysis()`, nothing run, so
  it works far beyond the machine's memory.

A strategy or linear layer trains in the zigzag layout where it takes it, a
local kernel in the natural order.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from jax.sharding import NamedSharding

from lca.bench import timing
from lca.bench.records import Point
from lca.kernels import registry
from lca.parallel import make_mesh
from lca.train import config_files, from_config
from lca.train import state as state_lib
from lca.train.evaluate import make_task

CONFIG = "configs/passkey.py"


def layout_for(name: str) -> str:
    entry = registry.get(name)
    return "zigzag" if "zigzag" in getattr(entry, "layouts", ()) else "contiguous"


def speed_kernels():
    return [registry.DEFAULT_STRATEGY, registry.baseline("local")]


def memory_kernels():
    """Every registry name the model can train with across a sequence mesh that the suite
    measures (sparse kernels run on one sequence shard: `experiments/bench.py --part sparse`)."""
    return [e.name for e in registry.entries()
            if e.kind in ("strategy", "linear") or e.kind == "local" and e.bench]


def with_kernel(exp, kernel: str, seq_len: int, batch: int):
    model = exp.model.replace(attention=(kernel,), layout=layout_for(kernel))
    return dataclasses.replace(
        exp, model=model, data=dataclasses.replace(exp.data, seq_len=seq_len, curriculum=()),
        train=dataclasses.replace(exp.train, batch_size=batch))


def _batch_for(mesh) -> int:
    shape = dict(mesh.shape)
    return shape.get("data", 1) * shape.get("fsdp", 1)


def _step(exp, mesh, abstract_only):
    if abstract_only:
        graphdef, abstract, shardings = state_lib.abstract_state(exp, mesh)
        ts = state_lib.TrainState(graphdef, abstract, shardings, mesh,
                                  state_lib.context(exp, mesh))
    else:
        ts = state_lib.create(exp, mesh)
    return ts, state_lib.make_train_step(ts)


def step_memory(exp, mesh):
    """(temporary, total) per-device bytes of one compiled train step (nothing runs)."""
    ts, step = _step(exp, mesh, abstract_only=True)
    b, t = exp.train.batch_size, exp.data.seq_len
    spec = state_lib.sharding_lib.spec_for(("batch", "length"), ts.ctx.activation_rules,
                                           mesh, (b, t))
    batch = {name: jax.ShapeDtypeStruct((b, t), dtype, sharding=NamedSharding(mesh, spec))
             for name, dtype in (("tokens", np.int32), ("targets", np.int32),
                                 ("weights", np.float32), ("positions", np.int32))}
    memory = step.lower(ts.state, batch).compile().memory_analysis()
    return int(memory.temp_size_in_bytes), timing.total_bytes(memory)


def longest_context(exp, mesh, budget_bytes, *, start=4096, limit=1 << 26, log=print):
    """(longest length that fits, its (temp, total) bytes): doubling, then bisection to 1/64."""
    probed = {}

    def fits(t):
        e = dataclasses.replace(exp, data=dataclasses.replace(exp.data, seq_len=t))
        probed[t] = step_memory(e, mesh)
        log(f"  T={t:>9,d}: {probed[t][1] / 2**30:8.2f} GiB per device")
        return probed[t][1] <= budget_bytes

    granule = 1024
    lo, hi, t = 0, None, start
    while t <= limit and hi is None:
        lo, hi, t = (t, None, 2 * t) if fits(t) else (lo, t, t)
    if lo == 0 or hi is None:
        return lo, probed.get(lo, (0, 0))
    while hi - lo > max(granule, lo // 64):
        mid = (lo + hi) // 2 // granule * granule
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, probed[lo]


def tokens_per_second(exp, mesh, steps=3):
    """(median, min, max) seconds of one train step after a warm-up step; its loss."""
    ts, step = _step(exp, mesh, abstract_only=False)
    batch = make_task(exp).batch(np.random.default_rng(0), exp.train.batch_size)
    dev = state_lib.device_batch(batch, exp, ts.ctx)
    state, metrics = step(ts.state, dev)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, dev)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), min(times), max(times)


def run(quick=False, *, config=CONFIG, seq_len=None, sequence=8, steps=3, budget_gib=20.0,
        log=print):
    """Points: `train` rows (speed at seq_len on a (sequence=n) mesh) and, unless quick,
    `context` rows (longest context in budget_gib per device on the config's own mesh)."""
    exp = from_config(config_files.load(config))
    seq_len = seq_len or (4096 if quick else 16384)
    m, rows = exp.model, []
    mesh = make_mesh({"sequence": sequence}, jax.devices()[:sequence])
    log(f"speed: T={seq_len}, mesh (sequence={sequence}), {steps} timed steps after a warm-up")
    for kernel in speed_kernels():
        e = with_kernel(exp, kernel, seq_len, _batch_for(mesh))
        median, low, high = tokens_per_second(e, mesh, steps)
        temp, total = step_memory(e, mesh)
        rows.append(Point("train", kernel, e.model.layout, sequence, m.heads, m.kv_heads,
                          seq_len, "train", None, temp, True, local=m.local,
                          batch=e.train.batch_size, total_bytes=total, seconds=median,
                          seconds_min=low, seconds_max=high, baseline=speed_kernels()[-1]))
        log(f"  {kernel:>9s}: {seq_len * e.train.batch_size / median:10,.0f} tokens/s")
    if quick:
        return rows
    budget = int(budget_gib * 2**30)
    log(f"memory: longest context whose train step fits {budget_gib:g} GiB per device, on the"
        f" config's mesh fitted to the kernel (its `:kernel` variant)")
    for kernel in memory_kernels():
        own = from_config(config_files.load(f"{config}:{kernel}"))
        mesh = make_mesh(dict(own.mesh_sizes(len(jax.devices()))))
        e = with_kernel(own, kernel, 1024, _batch_for(mesh))
        log(f" {kernel} ({e.model.layout}, mesh {dict(mesh.shape)}):")
        length, (temp, total) = longest_context(e, mesh, budget, log=log)
        rows.append(Point("context", kernel, e.model.layout, dict(mesh.shape).get("sequence", 1),
                          m.heads, m.kv_heads, length, "train", None, temp, True, local=m.local,
                          batch=e.train.batch_size, total_bytes=total))
    return rows
