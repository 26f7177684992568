"""Periodic and stand-alone evaluation on held-out data.

Retrieval tasks (passkey, recall): accuracy at each evaluation length and,
at the training length, by depth bin. Text: validation loss and bits per
byte. Evaluation batches come from their own stream (stream 1) of the run's
seed, which training (stream 0) never draws from; text uses the validation
files.

`generated_passkey` scores passkey retrieval the way a user meets it: the
prompt ends at the question, the model generates the key (greedy, through
the KV cache, `lca.generate`), and a key counts only if every digit is right.
It runs at several times the training length, on a mesh that shards the
cache over its sequence axis.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from flax import nnx

from lca.data import Batches, Passkey, Recall, StdlibText, batch_rng, from_layout
from lca.train import state as state_lib
from lca.train.config import Experiment

EVAL_STREAM = 1


def make_task(exp: Experiment, split: str = "train"):
    d = exp.data
    if d.task == "passkey":
        return Passkey(d.seq_len, key_len=d.key_len, vocab_size=d.vocab_size)
    if d.task == "recall":
        return Recall(d.seq_len, num_pairs=d.num_pairs, num_queries=d.num_queries,
                      vocab_size=d.vocab_size)
    return StdlibText(d.seq_len, split=split, validation_percent=d.validation_percent,
                      max_bytes=d.max_bytes)


def train_batches(exp: Experiment) -> Batches:
    return Batches(make_task(exp), exp.train.batch_size, exp.seed, stream=0,
                   curriculum=exp.data.curriculum)


@functools.lru_cache(maxsize=8)
def _model_graphdef(model_config):
    from lca.train.config import DataConfig, EvalConfig, TrainConfig
    return state_lib.model_graphdef(Experiment(model_config, DataConfig(), TrainConfig(),
                                               EvalConfig()))


def to_host(x) -> np.ndarray:
    """The whole value of a global array, on every process (a collective when some of
    its shards live in other processes: every process must call it)."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
    """Compiles one predict function per sequence length and reuses it."""

    def __init__(self, exp: Experiment, ctx, graphdef=None):
        self.exp, self.ctx = exp, ctx
        self.graphdef = graphdef if graphdef is not None else _model_graphdef(exp.model)
        self.predict = state_lib.make_predict(self.graphdef, ctx)

    def _run(self, model_state, batch):
        dev = state_lib.device_batch(batch, self.exp, self.ctx)
        preds, total, weight = self.predict(model_state, dev)
        preds = from_layout(to_host(preds), self.exp.model.layout, self.ctx.sequence_shards)
        return preds, float(to_host(total)), float(to_host(weight))

    def __call__(self, model) -> dict:
        """{name: value} for a model (or its nnx State)."""
        state = model if isinstance(model, nnx.State) else nnx.state(model)
        if self.exp.data.task == "text":
            return self.text(state)
        return self.retrieval(state)

    def text(self, state) -> dict:
        ev, exp = self.exp.eval, self.exp
        task = make_task(exp, split="validation")
        n = task.num_sequences()
        total = weight = 0.0
        for i in range(ev.batches):
            idx = (np.arange(ev.batch_size) + i * ev.batch_size) % n
            _, t, w = self._run(state, task.batch(None, ev.batch_size, indices=idx))
            total, weight = total + t, weight + w
        loss = total / max(weight, 1.0)
        return {"eval/loss": loss, "eval/bits_per_byte": loss / math.log(2)}

    def retrieval(self, state) -> dict:
        ev, exp = self.exp.eval, self.exp
        task = make_task(exp)
        out = {}
        for length in ev.lengths or (exp.data.seq_len,):
            correct, depth = [], []
            for i in range(ev.batches):
                rng = batch_rng(exp.seed, i + 1000 * length, EVAL_STREAM)
                # Depths evenly spread over the bins, so every bin is scored.
                depths = (np.arange(ev.batch_size) + rng.uniform(size=ev.batch_size)) / ev.batch_size
                batch = task.batch(rng, ev.batch_size, seq_len=length, depth=depths)
                preds, _, _ = self._run(state, batch)
                c, d = task.score(preds, batch)
                correct.append(c.ravel())
                depth.append(d.ravel())
            correct, depth = np.concatenate(correct), np.concatenate(depth)
            out[f"eval/accuracy@{length}"] = float(correct.mean())
            if length == exp.data.seq_len:
                out["eval/accuracy"] = float(correct.mean())
                bins = np.minimum((depth * ev.depth_bins).astype(int), ev.depth_bins - 1)
                for b in range(ev.depth_bins):
                    if (bins == b).any():
                        out[f"eval/accuracy_depth/{b / ev.depth_bins:.1f}"] = float(
                            correct[bins == b].mean())
        return out


def generated_passkey(model, exp: Experiment, lengths, mesh=None, log=None) -> dict:
    """{"eval/generated_accuracy@L": accuracy} for each length L: the held-out passkey
    examples `Evaluator.retrieval` scores at L (the same seeds and depths), cut after the
    question marker, the key generated greedily; on `mesh` (None: one device)."""
    import lca  # noqa: PLC0415

    if exp.data.task != "passkey":
        raise ValueError(f"generated evaluation is for config.data.task='passkey'; this run's"
                         f" task is {exp.data.task!r}")
    ev, task, n = exp.eval, make_task(exp), exp.data.key_len
    out = {}
    for length in lengths:
        correct = []
        for i in range(ev.batches):
            rng = batch_rng(exp.seed, i + 1000 * length, EVAL_STREAM)
            depths = (np.arange(ev.batch_size) + rng.uniform(size=ev.batch_size)) / ev.batch_size
            tokens = task.batch(rng, ev.batch_size, seq_len=length, depth=depths)["tokens"]
            answer = lca.generate(model, tokens[:, :length - n], n, mesh=mesh)
            correct.append((answer == tokens[:, length - n:]).all(axis=1))
        out[f"eval/generated_accuracy@{length}"] = float(np.concatenate(correct).mean())
        if log is not None:
            log(f"generated passkey accuracy at {length} tokens:"
                f" {out[f'eval/generated_accuracy@{length}']:.4f}")
    return out


def generation_mesh():
    """Every device on the sequence axis: the cache sharded as far as it goes."""
    import jax  # noqa: PLC0415

    from lca.parallel import make_mesh  # noqa: PLC0415
    return None if len(jax.devices()) == 1 else make_mesh({"sequence": len(jax.devices())})


def evaluate_checkpoint(workdir: str, step: int | None = None, mesh_axes: dict | None = None,
                        log=None, generate_multiples=()):
    """(step, metrics) of a checkpoint, on `mesh_axes` (default: the run's own mesh if the
    device count fits, else one device); `log(line)` is told the mesh used.
    generate_multiples: also `generated_passkey` at these multiples of the training
    length, on `generation_mesh()`."""
    import jax

    from lca.parallel import make_mesh
    from lca.train.checkpoint import load, saved_experiment

    exp, step = saved_experiment(workdir, step)
    if mesh_axes is None:
        try:
            mesh_axes = exp.mesh_sizes(len(jax.devices()))
        except ValueError:
            mesh_axes = {"data": 1}
    devices = jax.devices()[:1] if mesh_axes == {"data": 1} else None
    mesh = make_mesh(mesh_axes, devices)
    if log is not None:
        log(f"mesh: {dict(mesh.shape)} ({mesh.size} of {len(jax.devices())} devices)")
    model, exp, step = load(workdir, step, mesh=mesh)
    metrics = Evaluator(exp, state_lib.context(exp, mesh))(model)
    if generate_multiples:
        lengths = [int(m * exp.data.seq_len) for m in generate_multiples]
        gen_mesh = generation_mesh()
        if log is not None:
            log(f"generating on {dict(gen_mesh.shape) if gen_mesh else 'one device'}")
        metrics.update(generated_passkey(model, exp, lengths, gen_mesh, log))
    return step, metrics
