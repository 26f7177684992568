"""`lca.generate`: continue prompts through the KV cache, on one device or a mesh.

    tokens_BS = lca.generate(model, prompt_BT, steps)                  # greedy, one device
    tokens_BS = lca.generate(model, prompt_BT, steps, mesh=mesh)       # the cache sharded
    tokens_BS = lca.generate(model, prompt_BT, steps, temperature=0.8, top_k=20,
                             rng=jax.random.key(0))                    # sampled

Prefill runs the longest prefix of the prompt that splits over the mesh's
sequence shards in the model's layout (all of it on one device), through the
layers' training kernels; the rest of the prompt, then each generated token,
goes through the compiled decode step (`lca.models.cache`). One prefill and
one decode step compile per (prompt length, capacity).

Prompts in a batch have one length. Ragged prompts: generate per length (or
per prompt); left-padding would shift positions and let the pad tokens be
attended, which the model never saw in training.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lca import layouts
from lca.models import cache as cache_lib
from lca.parallel.sharding import ShardingContext

# Activation rules when the caller gives none: batch over data (and fsdp), the
# sequence over `sequence` then `ulysses`, heads over `tensor` (axes the mesh
# lacks are dropped).
RULES = (("batch", ("data", "fsdp")), ("length", ("sequence", "ulysses")),
         ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))


def context(mesh, rules=None) -> ShardingContext | None:
    """The sharding context `generate` runs in: None on one device."""
    return None if mesh is None else ShardingContext(mesh, RULES if rules is None else rules)


def prefill_length(prompt_len: int, config, ctx: ShardingContext | None) -> int:
    """The longest prefix of the prompt that prefill can split over ctx's sequence shards
    (the rest is decoded token by token)."""
    shards = cache_lib.shards_of(ctx)
    if shards == 1:
        return prompt_len
    m = int(np.lcm(layouts.multiple(config.layout, ctx.sequence_shards), shards))
    return prompt_len // m * m


@functools.lru_cache(maxsize=16)
def _programs(graphdef, ctx, prefill_len, capacity, batch):
    def prefill(state, tokens):
        model = nnx.merge(graphdef, state)
        if prefill_len == 0:
            return None, cache_lib.empty(model, batch, capacity, ctx)
        return model.prefill(tokens, capacity=capacity, ctx=ctx)

    def decode(state, cache, tokens):
        return nnx.merge(graphdef, state).decode(cache, tokens, ctx=ctx)

    return jax.jit(prefill), jax.jit(decode, donate_argnums=1)


@functools.partial(jax.jit, static_argnames=("greedy", "top_k"))
def _choose(logits_BV, key, temperature, *, greedy, top_k):
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV).astype(jnp.int32)


def _check(model, prompt, steps, temperature, top_k, rng, capacity):
    vocab = model.config.vocab_size
    if prompt.ndim != 2 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_BT must be an int array [batch, length]; got"
                         f" {prompt.dtype} of shape {prompt.shape}")
    if prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise ValueError(f"the prompt is empty (shape {prompt.shape}); give at least one"
                         " token per sequence (a BOS token if nothing else)")
    if prompt.size and (prompt.min() < 0 or prompt.max() >= vocab):
        raise ValueError(f"prompt tokens must be in [0, {vocab}) (the model's vocab_size);"
                         f" got {int(prompt.min())} .. {int(prompt.max())}")
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an int >= 0; got {steps!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy); got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be None or an int in 1 .. {vocab} (the vocab_size);"
                         f" got {top_k!r}")
    if temperature > 0 and rng is None:
        raise ValueError(f"temperature={temperature} samples: pass rng=jax.random.key(seed)")
    needed = prompt.shape[1] + steps
    if capacity is not None and capacity < needed:
        raise ValueError(f"prompt length {prompt.shape[1]} + steps {steps} = {needed} tokens"
                         f" exceed the cache capacity {capacity}; pass capacity >= {needed}"
                         " (or None: exactly what is needed)")


def _on_mesh(state, mesh):
    """The model's parameters on `mesh`: kept where they are if already placed on it (as
    `lca.load(mesh=mesh)` places them), else replicated over it."""
    replicated = NamedSharding(mesh, P())

    def put(x):
        sharding = getattr(x, "sharding", None)
        on_it = isinstance(sharding, NamedSharding) and sharding.mesh == mesh
        return x if on_it else jax.device_put(x, replicated)

    return jax.tree.map(put, state)


def generate(model, prompt_BT, steps: int, *, mesh=None, temperature: float = 0.0,
             top_k: int | None = None, rng=None, rules=None, capacity: int | None = None,
             progress: bool = False, return_logits: bool = False):
    """Continues each prompt by `steps` tokens: int32 [B, steps].

    Args:
      model: a `lca.models.Transformer` (e.g. from `lca.load`).
      prompt_BT: int [B, T], T >= 1, every prompt the same length, natural order.
      steps: tokens to generate per prompt.
      mesh: None (one device) or a mesh whose sequence axes shard the cache
        (`sequence`, and `ulysses` for a two-axis strategy; batch over `data`,
        heads over `tensor`, as `rules` say; default `RULES`). Parameters not
        already on it are replicated over it.
      temperature: 0 for greedy (argmax); > 0 samples from softmax(logits / temperature).
      top_k: sample among the k most likely tokens only.
      rng: a `jax.random.key`, needed to sample (step i uses fold_in(rng, i)).
      capacity: cache slots (>= T + steps; default T + steps), rounded up to
        whole decode tiles per shard.
      progress: a progress bar over the steps.
      return_logits: also return the float32 logits [B, steps, V] each token
        was chosen from.

    Greedy generation gives the tokens that recomputing the whole forward
    pass and taking the argmax at each step would (tests/test_generate.py).
    Bad arguments raise a ValueError before anything compiles.
    """
    prompt = np.asarray(prompt_BT)
    _check(model, prompt, steps, temperature, top_k, rng, capacity)
    b, t = prompt.shape
    if steps == 0:
        empty = np.zeros((b, 0), np.int32)
        return (empty, np.zeros((b, 0, model.config.vocab_size), np.float32)) \
            if return_logits else empty
    ctx = context(mesh, rules)
    capacity = t + steps if capacity is None else int(capacity)
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = _on_mesh(state, mesh)
    p = prefill_length(t, model.config, ctx)
    prefill, decode = _programs(graphdef, ctx, p, capacity, b)
    prompt = prompt.astype(np.int32)
    logits, cache = prefill(state, prompt[:, :p])
    for j in range(p, t):
        logits, cache = decode(state, cache, prompt[:, j])
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415
        bar = tqdm(total=steps, unit="token", dynamic_ncols=True)
    out, scores = [], []
    for i in range(steps):
        key = jax.random.fold_in(rng, i) if rng is not None else jax.random.key(0)
        token = _choose(logits, key, jnp.float32(max(temperature, 1e-6)),
                        greedy=temperature == 0, top_k=top_k)
        out.append(token)
        if return_logits:
            scores.append(logits)
        if i + 1 < steps:
            logits, cache = decode(state, cache, token)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    tokens = np.asarray(jnp.stack(out, axis=1))
    return (tokens, np.asarray(jnp.stack(scores, axis=1))) if return_logits else tokens
