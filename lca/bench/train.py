"""Training-step benchmarks of a configured model: tokens per second, and memory vs context.

Both take an `Experiment` (a config) and change only the attention kernel,
the layout and the sequence length, so kernels are compared on the same
model, mesh and batch.

- `tokens_per_second`: median wall time of the jitted train step on real
  arrays (after one warm-up step), as global tokens per second.
- `step_memory`: per-device bytes of one compiled train step, from
  `compiled.memory_analysis()` (arguments + outputs + temporaries - aliased
  donations); nothing runs, so it works far beyond the machine's memory.
- `longest_context`: the largest length (a multiple of `granule`) whose step
  fits a per-device budget, by doubling then bisection.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from jax.sharding import NamedSharding

from lca.train import state as state_lib
from lca.train.config import Experiment
from lca.train.evaluate import make_task


def with_kernel(exp: Experiment, kernel: str, layout: str, seq_len: int) -> Experiment:
    model = exp.model.replace(attention=(kernel,), layout=layout)
    data = dataclasses.replace(exp.data, seq_len=seq_len, curriculum=())
    return dataclasses.replace(exp, model=model, data=data)


def _train_step(exp: Experiment, mesh, abstract_only: bool):
    graphdef, abstract, shardings = state_lib.abstract_state(exp, mesh)
    if abstract_only:
        ts = state_lib.TrainState(graphdef, abstract, shardings, mesh,
                                  state_lib.context(exp, mesh))
    else:
        ts = state_lib.create(exp, mesh)
    return ts, state_lib.make_train_step(ts)


def _abstract_batch(exp: Experiment, ctx):
    b, t = exp.train.batch_size, exp.data.seq_len
    shapes = {"tokens": np.int32, "targets": np.int32, "weights": np.float32,
              "positions": np.int32}
    out = {}
    for name, dtype in shapes.items():
        spec = state_lib.sharding_lib.spec_for(("batch", "length"), ctx.activation_rules,
                                               ctx.mesh, (b, t))
        out[name] = jax.ShapeDtypeStruct((b, t), dtype, sharding=NamedSharding(ctx.mesh, spec))
    return out


def step_memory(exp: Experiment, mesh) -> dict:
    """Per-device bytes of one compiled train step (no execution)."""
    ts, step = _train_step(exp, mesh, abstract_only=True)
    compiled = step.lower(ts.state, _abstract_batch(exp, ts.ctx)).compile()
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return {"total": int(total), "temp": int(m.temp_size_in_bytes),
            "arguments": int(m.argument_size_in_bytes)}


def longest_context(exp: Experiment, mesh, budget_bytes: int, *, granule: int,
                    start: int, limit: int, log=None):
    """(longest fitting length, its per-device bytes, {length: bytes} probed)."""
    probed = {}

    def fits(t):
        probed[t] = step_memory(dataclasses.replace(
            exp, data=dataclasses.replace(exp.data, seq_len=t, curriculum=())), mesh)["total"]
        if log:
            log(f"  T={t:>9,d}: {probed[t] / 2**30:8.2f} GiB per device")
        return probed[t] <= budget_bytes

    lo, hi = 0, None
    t = start
    while t <= limit:
        if fits(t):
            lo, t = t, t * 2
        else:
            hi = t
            break
    if lo == 0:
        return 0, None, probed
    if hi is None:
        return lo, probed[lo], probed
    while hi - lo > granule:
        mid = (lo + hi) // 2 // granule * granule
        if mid in (lo, hi):
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, probed[lo], probed


def tokens_per_second(exp: Experiment, mesh, *, steps: int = 3) -> dict:
    """Global training tokens per second (median over `steps` after one warm-up)."""
    ts, step = _train_step(exp, mesh, abstract_only=False)
    task = make_task(exp)
    batch = task.batch(np.random.default_rng(0), exp.train.batch_size)
    dev = state_lib.device_batch(batch, exp, ts.ctx)
    start = time.perf_counter()
    state, metrics = step(ts.state, dev)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, dev)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    tokens = exp.train.batch_size * exp.data.seq_len
    return {"step_s": median, "tokens_per_s": tokens / median, "first_step_s": first,
            "loss": float(metrics["loss"])}

