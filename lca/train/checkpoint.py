"""Orbax checkpoints: train state, config and data-iterator state, and `lca.load`.

Layout of a workdir's `checkpoints/<step>/`: `model` (the model's nnx State),
`optimizer` (its State), `config` (`Experiment.to_dict()`, JSON) and `data`
(the iterator state, JSON). Saving is asynchronous; the manager keeps the
last `keep_checkpoints`. Restoring builds an abstract State whose shardings
come from the target mesh and the config's parameter rules, restores into
it, and merges: the same call works on the mesh that wrote the checkpoint, on
another mesh, and on one CPU device.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lca.parallel import make_mesh
from lca.train import state as state_lib
from lca.train.config import Experiment


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, exp: Experiment | None = None, *, read_only=False):
    keep = exp.train.keep_checkpoints if exp is not None else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=not read_only, read_only=read_only,
        create=not read_only)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=("model", "optimizer", "config", "data"))


def save(mngr, step: int, ts: state_lib.TrainState, exp: Experiment, data_state: dict,
         force=False) -> None:
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(ts.state[0]),
        optimizer=ocp.args.StandardSave(ts.state[1]),
        config=ocp.args.JsonSave(exp.to_dict()),
        data=ocp.args.JsonSave(data_state)), force=force)


def read_config(mngr, step: int) -> Experiment:
    restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return Experiment.from_dict(restored["config"])


def check_compatible(saved: Experiment, exp: Experiment, workdir: str) -> None:
    """Raises a ValueError naming the model options that change parameter shapes."""
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    shapes = []
    for e in (saved, exp):
        _, abstract, _ = state_lib.abstract_state(e, mesh)
        shapes.append(jax.tree.map(lambda a: a.shape, abstract[0]))
    if jax.tree.structure(shapes[0]) != jax.tree.structure(shapes[1]) or shapes[0] != shapes[1]:
        changed = {f.name: (getattr(saved.model, f.name), getattr(exp.model, f.name))
                   for f in dataclasses.fields(exp.model)
                   if getattr(saved.model, f.name) != getattr(exp.model, f.name)}
        raise ValueError(
            f"workdir {workdir} holds a checkpoint of a different model shape;"
            f" config.model options (saved, now): {changed}. Use another --workdir or the"
            " saved config.")


def restore_train(mngr, step: int, ts: state_lib.TrainState, exp: Experiment):
    """Restores (model, optimizer) into `ts`'s shardings; returns (TrainState, data state)."""
    _, abstract, _ = state_lib.abstract_state(exp, ts.mesh)
    restored = mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract[0]),
        optimizer=ocp.args.StandardRestore(abstract[1]),
        data=ocp.args.JsonRestore()))
    # Same pytree structure as a fresh state, so the compiled train step is reused.
    leaves = jax.tree.leaves((restored["model"], restored["optimizer"]))
    state = jax.tree.unflatten(jax.tree.structure(abstract), leaves)
    return dataclasses.replace(ts, state=state), restored["data"]


def _step(mngr, workdir, step):
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(f"no checkpoint{'' if step is None else f' {step}'} under"
                                f" {checkpoint_dir(workdir)}; steps: {mngr.all_steps()}")
    return step


def saved_experiment(workdir: str, step: int | None = None):
    """(Experiment, step) saved with a checkpoint (default: the newest)."""
    mngr = manager(workdir, read_only=True)
    step = _step(mngr, workdir, step)
    exp = read_config(mngr, step)
    mngr.close()
    return exp, step


def default_mesh():
    return make_mesh({"data": 1}, devices=jax.devices("cpu")[:1])


def load(workdir: str, step: int | None = None, mesh=None):
    """`(model, config, step)` from a workdir's checkpoint, restored onto `mesh`.

    mesh: any mesh (its axes among data, fsdp, sequence, tensor); default one
    CPU device. Parameters are placed by the saved config's parameter rules.
    Call the model with `ctx=lca.train.state.context(config, mesh)` to shard
    activations, or with no ctx on one device (sequence-parallel kernels then
    run as `blockwise`, which computes the same attention).
    """
    mngr = manager(workdir, read_only=True)
    step = _step(mngr, workdir, step)
    exp = read_config(mngr, step)
    mesh = default_mesh() if mesh is None else mesh
    _, abstract, _ = state_lib.abstract_state(exp, mesh)
    model_graphdef = state_lib.model_graphdef(exp)
    restored = mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract[0])))
    mngr.close()
    return nnx.merge(model_graphdef, restored["model"]), exp, step
