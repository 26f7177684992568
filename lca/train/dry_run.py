"""`experiments/train.py --dry_run`: what a run would be, without running it.

Prints the resolved config, the mesh, the per-device bytes of parameters and
optimizer state (from the abstract state's shardings: nothing is allocated),
and the per-device memory of one compiled train step at the longest training
length (XLA's `memory_analysis()` of the compiled step: its temporaries are
the activations and workspace; nothing is executed). Runs every check
`train` runs first, and writes nothing.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from lca.data import batch_rng
from lca.data import batches as batches_lib
from lca.parallel import mesh as mesh_lib
from lca.train import checkpoint as ckpt_lib
from lca.train import state as state_lib
from lca.train.config import Experiment
from lca.train.evaluate import make_task
from lca.train.loop import _compile_key, prepare


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays with shardings (the largest shard)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
               for a in jax.tree.leaves(tree))


def _abstract_batch(exp: Experiment, ctx, seq_len: int) -> dict:
    """Shapes, dtypes and shardings of a training batch of `seq_len` tokens (in layout order)."""
    batch = make_task(exp).batch(batch_rng(exp.seed, 0), exp.train.batch_size, seq_len)
    batch = batches_lib.to_layout(batch, exp.model.layout, ctx.sequence_shards)
    batch = {k: np.asarray(v) for k, v in batch.items() if k in state_lib.BATCH_FIELDS}
    shardings = state_lib.batch_shardings(batch, ctx)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
            for k, v in batch.items()}


def estimate(exp: Experiment, mesh) -> dict:
    """Per-device bytes: params, optimizer state, and the compiled train step's memory."""
    graphdef, abstract, shardings = state_lib.abstract_state(exp, mesh)
    ts = state_lib.TrainState(graphdef, abstract, shardings, mesh, state_lib.context(exp, mesh))
    seq_len = max([exp.data.seq_len] + [n for n, _ in exp.data.curriculum])
    # The run's own jit function, so that a run in this process can reuse the compilation.
    step = state_lib.make_train_step(ts, _compile_key(exp))
    m = step.lower(abstract, _abstract_batch(exp, ts.ctx, seq_len)).compile().memory_analysis()
    params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract[0]))
    return {"param_count": params, "seq_len": seq_len,
            "params": _per_device_bytes(abstract[0]), "optimizer": _per_device_bytes(abstract[1]),
            "step_temp": int(m.temp_size_in_bytes), "step_arguments": int(m.argument_size_in_bytes),
            "step_outputs": int(m.output_size_in_bytes), "step_aliased": int(m.alias_size_in_bytes)}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def describe(exp: Experiment, workdir: str, log=print) -> str:
    """The dry-run report; raises what `train` would raise (a ValueError naming the option)."""
    mesh, found = prepare(exp, workdir, log)
    lines = ["config:"]
    lines += [f"  {k} = {v!r}" for k, v in _flat(exp.to_dict())]
    devices = mesh.devices.flatten()
    lines.append(f"mesh: {dict(mesh.shape)} over {len(devices)} {devices[0].platform} devices"
                 f" ({jax.process_count()} process(es))"
                 + (f", axes split over slices (config.dcn): {dict(exp.dcn)}" if exp.dcn else ""))
    lines += [f"  {line}" for line in mesh_lib.describe(mesh.devices, mesh.axis_names)]
    e = estimate(exp, mesh)
    total = e["step_arguments"] + e["step_outputs"] + e["step_temp"] - e["step_aliased"]
    lines += [
        f"parameters: {e['param_count']:,}",
        "per device:",
        f"  parameters       {_mib(e['params'])}",
        f"  optimizer state  {_mib(e['optimizer'])}",
        f"  activations and workspace of one train step at {e['seq_len']} tokens"
        f" (compiled temporaries) {_mib(e['step_temp'])}",
        f"  train step in all (arguments + outputs + temporaries - donated) {_mib(total)}",
    ]
    if found.steps:
        lines.append(f"workdir: would resume from step {found.steps[0]} of"
                     f" {ckpt_lib.checkpoint_dir(workdir)} (steps {found.steps})")
    else:
        lines.append(f"workdir: {os.path.abspath(workdir)} (no checkpoint; starts at step 0)")
    if found.incomplete:
        lines.append(f"  interrupted saves that a run would set aside: {found.incomplete}")
    lines.append("dry run: nothing was trained or written")
    return "\n".join(lines)


__all__ = ["describe", "estimate"]
