"""Model and optimizer on a mesh: sharded initialisation, the train step, the forward pass.

The train state is `nnx.split((model, optimizer))`: one graphdef and one
State; `jax.jit` runs over (state, batch) with the state's shardings fixed
from the parameter rules, so every step keeps the layout it started with.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lca.data import batches as batches_lib
from lca.models import Transformer, cross_entropy
from lca.parallel import sharding as sharding_lib
from lca.train.config import Experiment

BATCH_FIELDS = ("tokens", "targets", "weights", "positions", "segment_ids")


def learning_rate_schedule(exp: Experiment):
    t = exp.train
    return optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, max(t.warmup_steps, 1), max(t.steps, t.warmup_steps + 1),
        end_value=t.learning_rate * t.end_learning_rate_fraction)


def optimizer(exp: Experiment) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, after global-norm clipping."""
    t = exp.train
    return optax.chain(
        optax.clip_by_global_norm(t.clip_norm),
        optax.adamw(learning_rate_schedule(exp), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))


@dataclasses.dataclass
class TrainState:
    """What a run holds: graphdef + sharded State of (model, optimizer), and its shardings."""

    graphdef: Any
    state: Any
    shardings: Any
    mesh: Mesh
    ctx: sharding_lib.ShardingContext

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.state)[0]


def _init_fn(exp: Experiment):
    def init():
        model = Transformer(exp.model, rngs=nnx.Rngs(params=exp.seed))
        return model, nnx.Optimizer(model, optimizer(exp), wrt=nnx.Param)
    return init


def abstract_state(exp: Experiment, mesh: Mesh):
    """(graphdef, abstract State with shardings, shardings) of (model, optimizer); no FLOPs."""
    graphdef, abstract = nnx.split(nnx.eval_shape(_init_fn(exp)))
    shardings = sharding_lib.param_shardings(abstract, exp.param_rules, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return graphdef, abstract, shardings


def model_graphdef(exp: Experiment):
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(exp.model, rngs=nnx.Rngs(0))))


def create(exp: Experiment, mesh: Mesh) -> TrainState:
    """Initialises (model, optimizer) on one device, then places it by the parameter rules.

    (Compiling the initialiser for the whole mesh partitions every random
    number generator and takes longer than the train step; the state is small.)
    """
    graphdef, _, shardings = abstract_state(exp, mesh)
    if exp not in _INITS:
        _INITS.clear()
        _INITS[exp] = jax.jit(lambda: nnx.split(_init_fn(exp)())[1])
    with jax.default_device(jax.local_devices()[0]):
        state = _INITS[exp]()
    if jax.process_count() > 1:
        # Every process initialised the same state from the same seed; each
        # places the shards of its own devices.
        state = place(jax.device_get(state), shardings)
    else:
        state = jax.device_put(state, shardings)
    return TrainState(graphdef, state, shardings, mesh, context(exp, mesh))


def place(tree, shardings):
    """Global arrays from host values that every process holds in full (same on all).

    Each process copies only the slices its own devices hold, so this is the
    one placement for one process and for many (`jax.device_put` of a
    non-fully-addressable sharding would first compare the value across
    processes).
    """
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, tree, shardings)


def context(exp: Experiment, mesh: Mesh | None) -> sharding_lib.ShardingContext:
    return sharding_lib.ShardingContext(mesh, exp.activation_rules)


def batch_shardings(batch: dict, ctx: sharding_lib.ShardingContext) -> dict:
    out = {}
    for name, x in batch.items():
        logical = ("batch", "length")[:np.ndim(x)] + (None,) * max(np.ndim(x) - 2, 0)
        out[name] = NamedSharding(ctx.mesh, sharding_lib.spec_for(
            logical, ctx.activation_rules, ctx.mesh, np.shape(x)))
    return out


def device_batch(batch: dict, exp: Experiment, ctx: sharding_lib.ShardingContext) -> dict:
    """Natural-order NumPy batch -> layout order (the one permutation) -> sharded arrays.

    Every process passes the same global batch and places its own shards.
    """
    batch = batches_lib.to_layout(batch, exp.model.layout, ctx.sequence_shards)
    batch = {k: np.asarray(v) for k, v in batch.items() if k in BATCH_FIELDS}
    if ctx.mesh is None:
        return jax.device_put(batch)
    return place(batch, batch_shardings(batch, ctx))


def forward(model: Transformer, batch: dict, ctx):
    return model(batch["tokens"], batch.get("positions"), batch.get("segment_ids"), ctx=ctx)


def loss_and_metrics(model: Transformer, batch: dict, ctx):
    logits = forward(model, batch, ctx)
    total, weight, correct = cross_entropy(logits, batch["targets"], batch["weights"])
    loss = total / jnp.maximum(weight, 1.0)
    return loss, {"loss": loss, "token_accuracy": correct / jnp.maximum(weight, 1.0),
                  "loss_tokens": weight}


def make_train_step(ts: TrainState, exp: Experiment | None = None):
    """jit((state, batch) -> (state, metrics)); with `exp`, one function per (exp, mesh)
    per process, so a resumed run in the same process reuses its compilation."""
    if exp is None:
        return _train_step(ts.graphdef, ts.ctx, ts.shardings)
    key = (exp, ts.mesh)
    if key not in _TRAIN_STEPS:
        _TRAIN_STEPS.clear()  # keep one: they hold compiled executables
        _TRAIN_STEPS[key] = _train_step(ts.graphdef, ts.ctx, ts.shardings)
    return _TRAIN_STEPS[key]


_TRAIN_STEPS: dict = {}
_INITS: dict = {}


def _train_step(graphdef, ctx, shardings):

    def step(state, batch):
        before = jax.tree.leaves(state)
        model, opt = nnx.merge(graphdef, state)
        grads, metrics = nnx.grad(lambda m: loss_and_metrics(m, batch, ctx), has_aux=True)(model)
        opt.update(model, grads)
        metrics["grad_norm"] = optax.tree.norm(grads)
        # A non-finite loss or gradient leaves the state as it was (the loop
        # then stops or counts a skipped step); `grads_finite` has one flag
        # per gradient leaf, in `grad_leaf_names` order, to name the layer.
        metrics["grads_finite"] = jnp.stack([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)])
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & metrics["grads_finite"].all()
        after = nnx.split((model, opt))[1]
        kept = [jnp.where(metrics["finite"], a, b) for a, b in zip(jax.tree.leaves(after), before)]
        return jax.tree.unflatten(jax.tree.structure(after), kept), metrics

    return jax.jit(step, out_shardings=(shardings, None), donate_argnums=0)


def grad_leaf_names(ts: TrainState) -> list[str]:
    """Paths ('blocks/0/attn/wk') of the gradient leaves, in `grads_finite` order."""
    model = nnx.merge(ts.graphdef, ts.state)[0]

    def name(path):
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        return "/".join(keys[:-1] if keys[-1] == "value" else keys)

    return [name(path) for path, _ in
            jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]


@functools.lru_cache(maxsize=8)
def make_predict(graphdef, ctx):
    """jit((model state, batch) -> argmax predictions and mean loss), all in layout order."""

    def predict(model_state, batch):
        model = nnx.merge(graphdef, model_state)
        logits = forward(model, batch, ctx)
        total, weight, _ = cross_entropy(logits, batch["targets"], batch["weights"])
        return jnp.argmax(logits, -1), total, weight

    return jax.jit(predict)
