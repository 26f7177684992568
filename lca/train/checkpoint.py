"""Orbax checkpoints: train state, config and data-iterator state, and `lca.load`.

Layout of a workdir's `checkpoints/<step>/`: `model` (the model's nnx State),
`optimizer` (its State), `config` (`Experiment.to_dict()`, JSON) and `data`
(the iterator state, JSON). Saving is asynchronous; the manager keeps the
last `keep_checkpoints`. Restoring builds an abstract State whose shardings
come from the target mesh and the config's parameter rules, restores into
it, and merges: the same call works on the mesh that wrote the checkpoint, on
another mesh, and on one CPU device.

Damaged checkpoints. Orbax writes a step into `<step>.orbax-checkpoint-tmp*`
and renames it when complete, so a process killed mid-save leaves such a
directory and no `<step>/`. `scan` reports those; a step directory that
cannot be read back (a truncated or corrupted file) is found when restoring.
Either kind is moved, never deleted, to `<workdir>/checkpoints_unusable/`
with a warning (`set_aside`), and the run resumes from the newest checkpoint
that restores.
"""

from __future__ import annotations

import dataclasses
import logging as pylogging
import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lca.parallel import make_mesh
from lca.train import state as state_lib
from lca.train.config import Experiment


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


UNUSABLE_DIR = "checkpoints_unusable"
TMP_MARK = ".orbax-checkpoint-tmp"


class _QuietReadOnly(pylogging.Filter):
    """Orbax warns 'Given directory is read only' on every read-only manager: a load, not news."""

    def filter(self, record):
        return not str(record.msg).startswith("Given directory is read only")


pylogging.getLogger("absl").addFilter(_QuietReadOnly())


def manager(workdir: str, exp: Experiment | None = None, *, read_only=False):
    keep = exp.train.keep_checkpoints if exp is not None else None
    # cleanup_tmp_directories stays off: an interrupted save is set aside by
    # `set_aside` with a warning, not removed behind the user's back.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=not read_only, read_only=read_only,
        create=not read_only, cleanup_tmp_directories=False)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=("model", "optimizer", "config", "data"))


def save(mngr, step: int, ts: state_lib.TrainState, exp: Experiment, data_state: dict,
         force=False) -> None:
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(ts.state[0]),
        optimizer=ocp.args.StandardSave(ts.state[1]),
        config=ocp.args.JsonSave(exp.to_dict()),
        data=ocp.args.JsonSave(data_state)), force=force)


@dataclasses.dataclass
class Found:
    """What `scan` saw under `checkpoints/`: complete steps (newest first) and interrupted saves."""
    steps: list
    incomplete: list       # paths of `<step>.orbax-checkpoint-tmp*` directories
    unreadable: dict = dataclasses.field(default_factory=dict)  # step -> why (its config)


def scan(workdir: str) -> Found:
    """Lists `checkpoints/` without writing anything (the directory need not exist)."""
    root = checkpoint_dir(workdir)
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    steps = sorted((int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(root, n))),
                   reverse=True)
    return Found(steps, [os.path.join(root, n) for n in names if TMP_MARK in n])


def why(error: Exception) -> str:
    """A one-line account of an exception (Orbax/TensorStore messages run to pages)."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"


def newest_readable_config(workdir: str, found: Found, log=print):
    """(Experiment, step) of the newest checkpoint whose config reads, or (None, None).

    Steps whose config does not read are noted in `found.unreadable`."""
    if not found.steps:
        return None, None
    mngr = manager(workdir, read_only=True)
    try:
        for step in found.steps:
            try:
                return read_config(mngr, step), step
            except Exception as e:  # noqa: BLE001 (any failure to read means: not usable)
                found.unreadable[step] = why(e)
                log(f"WARNING: the config of checkpoint step {step} does not read"
                    f" ({found.unreadable[step]}); trying an older one")
    finally:
        mngr.close()
    return None, None


def set_aside(workdir: str, path: str, why: str, log=print) -> str:
    """Moves a damaged checkpoint directory to `<workdir>/checkpoints_unusable/` (never deletes)."""
    target_dir = os.path.join(os.path.abspath(workdir), UNUSABLE_DIR)
    target = os.path.join(target_dir, os.path.basename(path))
    n = 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(target_dir, f"{os.path.basename(path)}.{n}")
    if jax.process_index() == 0:
        os.makedirs(target_dir, exist_ok=True)
        shutil.move(path, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        multihost_utils.sync_global_devices(f"lca set_aside {path}")
    log(f"WARNING: skipping {why} checkpoint {path}; moved it to {target} (not deleted:"
        " inspect it, then remove it yourself)")
    return target


def read_config(mngr, step: int) -> Experiment:
    restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return Experiment.from_dict(restored["config"])


def check_compatible(saved: Experiment, exp: Experiment, workdir: str) -> None:
    """Raises a ValueError naming the kernel set or the model options that change shapes."""
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
    if saved.model.attention != exp.model.attention:
        raise ValueError(
            f"workdir {workdir} holds a checkpoint trained with config.model.attention="
            f"{','.join(saved.model.attention)!r}, but the config says"
            f" {','.join(exp.model.attention)!r}; set config.model.attention="
            f"{','.join(saved.model.attention)!r} to resume, or use another --workdir")


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
    activations, or with no ctx on one device (a strategy layer then runs its
    local kernel, `config.model.local`, alone: the same attention).
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
