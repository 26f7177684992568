"""The layer -> kernel call: a layer names a registry entry, an adapter calls it.

Dimension legend: B batch, T length (layout order), H heads, K kv heads, D head_dim.

`config.model.attention` names entries of `lca.kernels.registry`; each kind
has one adapter here, so a kernel registered there is usable by the model
with nothing added here:

  local     the kernel on the tokens this program holds (`lca.attention`);
  strategy  the strategy over the mesh's sequence axis (or, for a two-axis
            strategy, the all-to-all and ring axes the rules shard `length`
            over), running the local kernel `config.model.local` on each shard
            (`lca.parallel.sequence.attention_in_layout`); with one sequence
            shard, that local kernel alone;
  linear    causal linear attention; its adapter owns the layer's kernel
            parameters (`LinearParams`: decay, feature-map weights);
  sparse    a sparse kernel (`lca.models.sparse`): buckets or kept tokens from
            the layer's own q and k, on one sequence shard.

A layer builds one `KernelCall` from its config (the mask spec, the layout,
the local kernel, the tiles, the linear options) and passes it, with the
sharding context and the positions and segment ids of its tokens in layout
order, to `adapter(name)`. K and V keep their K heads throughout.

For inference each adapter also has `prefill` (the same call, plus what the
layer's cache keeps: K/V for a softmax kernel, the final state for a linear
one) and `decode` (one new token against that cache entry; softmax kinds by
`lca.kernels.decode`, over the sharded cache on a mesh).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lca.attention import attention as local_attention
from lca.kernels import decode as decode_lib
from lca.kernels import feature_maps, registry
from lca.kernels.linear import linear_attention, linear_attention_step
from lca.kernels.masks import MaskSpec
from lca.models.config import LinearOptions, ModelConfig, SparseOptions
from lca.models.layers import param
from lca.parallel.linear import attention_in_layout_linear
from lca.parallel.sequence import KV_TOKENS, TOKENS, attention_in_layout
from lca.parallel.sharding import ShardingContext, activation_spec


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """What a layer's kernel needs besides the arrays: static, resolved once per layer.

    block_q / block_k None: the local kernel's default tiles from the registry
    (`lca.kernels.local.default_tiles`), resolved for each call's shapes.
    """

    name: str
    local: str
    spec: MaskSpec
    layout: str
    block_q: int | None
    block_k: int | None
    linear: LinearOptions
    sparse: SparseOptions = SparseOptions()

    @classmethod
    def from_config(cls, config: ModelConfig, name: str) -> "KernelCall":
        adapter(name)  # unknown names fail here, before anything is traced
        return cls(name, config.local, MaskSpec(True, config.window or None), config.layout,
                   config.block_q or None, config.block_k or None, config.linear,
                   config.sparse)

    def tiles(self):
        return {k: v for k, v in (("block_q", self.block_q), ("block_k", self.block_k))
                if v is not None}


def _one_device(impl, q, k, v, call, positions, segment_ids):
    tiles = call.tiles() if registry.local_kernel(impl).tiles else {}
    return local_attention(q, k, v, impl=impl, causal=True, window=call.spec.window,
                           segment_ids=segment_ids, positions=positions,
                           kv_positions=positions, **tiles)


def _sharded(ctx: ShardingContext | None) -> bool:
    return ctx is not None and ctx.total_sequence_shards > 1


def cache_specs(ctx: ShardingContext, q_shape, k_shape, cache_shape):
    """(one token's q spec, its k/v spec, the K/V cache spec) on ctx's mesh: batch and heads
    as the activation rules say, the cache's slots over the sequence axes (ring-major)."""
    rules, mesh, axes = ctx.activation_rules, ctx.mesh, ctx.sequence_axes
    return (activation_spec(TOKENS, rules, mesh, q_shape),
            activation_spec(KV_TOKENS, rules, mesh, k_shape),
            activation_spec(KV_TOKENS, rules, mesh, cache_shape, axes))


class SoftmaxAdapter:
    """What every softmax kind shares: its cache entry is the layer's K/V."""

    def params(self, config, rngs):
        return None

    def prefill(self, q, k, v, call, ctx, positions, params):
        return self(q, k, v, call, ctx, positions, None, params), (k, v)

    def decode(self, q, k, v, entry, view, call, ctx, params):
        """q [B, 1, H, D], k, v [B, 1, K, D] of the token at `view.length` ->
        (out [B, 1, H, D], the entry with the token written)."""
        k_cache, v_cache = entry
        args = (q, k, v, k_cache, v_cache, view.positions, view.length, view.prefilled)
        options = dict(window=call.spec.window, block=view.tile)
        if not _sharded(ctx):
            out, k_cache, v_cache = decode_lib.attend_cache(*args, **options)
        else:
            out, k_cache, v_cache = decode_lib.attend_cache(
                *args, **options, mesh=ctx.mesh, axes=ctx.sequence_axes,
                specs=cache_specs(ctx, q.shape, k.shape, k_cache.shape), gather=view.gather)
        return out, (k_cache, v_cache)


class LocalAdapter(SoftmaxAdapter):
    """A local kernel on the tokens this program holds."""

    def __call__(self, q, k, v, call, ctx, positions, segment_ids, params):
        return _one_device(call.name, q, k, v, call, positions, segment_ids)


class StrategyAdapter(SoftmaxAdapter):
    """A strategy over the sequence axis, or its local kernel alone on one sequence shard."""

    def __call__(self, q, k, v, call, ctx, positions, segment_ids, params):
        if not _sharded(ctx):
            return _one_device(call.local, q, k, v, call, positions, segment_ids)
        axis = ctx.strategy_axis(call.name, registry.get(call.name).axes)
        return attention_in_layout(
            q, k, v, mesh=ctx.mesh, axis=axis, impl=call.name, local=call.local,
            layout=call.layout, causal=True, window=call.spec.window, positions=positions,
            segment_ids=segment_ids, rules=ctx.activation_rules, **call.tiles())


class LinearParams(nnx.Module):
    """A linear layer's kernel parameters.

    decay_logit [H]: log_decay = -softplus(decay_logit) <= 0 whatever training
    does; per-head decays start spread over 1 - 2^-5 .. 1 - 2^-9 (as retention
    does). hedgehog [K, D, F] and hedgehog_bias [K, F]: one feature map per kv
    head, shared by its group's query heads as K and V are; it starts at the
    identity map (as its paper does).
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        lin, h, kh, d = config.linear, config.heads, config.kv_heads, config.head_dim
        if lin.decay:
            log_rates = jnp.log1p(-(2.0 ** (-5.0 - 4.0 * jnp.arange(h) / max(h - 1, 1))))
            logit = jnp.log(jnp.expm1(-log_rates))  # softplus^-1(-log_rates)
            self.decay_logit = param(rngs, (h,), ("heads",), value=logit)
        if lin.feature_map == "hedgehog":
            f = lin.hedgehog_dim or d
            eye = jnp.broadcast_to(jnp.eye(d, f), (kh, d, f))
            self.hedgehog = param(rngs, (kh, d, f), ("kv_heads", "head_dim", None), value=eye)
            self.hedgehog_bias = param(rngs, (kh, f), ("kv_heads", None),
                                       value=jnp.zeros((kh, f)))

    def log_decay(self):
        return -jax.nn.softplus(self.decay_logit[...]) if hasattr(self, "decay_logit") else None

    def feature_map(self, name: str, x_BTHD):
        """The named map of `lca.kernels.feature_maps`; hedgehog with this layer's weights,
        each kv head's map applied to its group of query heads."""
        if name == "identity":
            return x_BTHD
        fn = getattr(feature_maps, name, None)
        if fn is None:
            raise ValueError(f"config.model.linear.feature_map {name!r} is not in"
                             " lca.kernels.feature_maps")
        if name != "hedgehog":
            return fn(x_BTHD)
        groups = x_BTHD.shape[2] // self.hedgehog.shape[0]
        w, b = self.hedgehog[...], self.hedgehog_bias[...]
        return fn(x_BTHD, jnp.repeat(w, groups, axis=0), jnp.repeat(b, groups, axis=0))


class LinearAdapter:
    """Causal linear attention: feature map, per-head decay, state passed across shards."""

    def params(self, config, rngs):
        return LinearParams(config, rngs)

    def __call__(self, q, k, v, call, ctx, positions, segment_ids, params: LinearParams):
        """Packed documents (segment_ids) restart the state at each boundary."""
        return self._run(q, k, v, call, ctx, params, return_state=False,
                         segment_ids=segment_ids)

    def prefill(self, q, k, v, call, ctx, positions, params):
        """(out, the state after the last token): the cache entry, replicated over the
        sequence axes."""
        return self._run(q, k, v, call, ctx, params, return_state=True)

    def decode(self, q, k, v, entry, view, call, ctx, params):
        """One recurrent step from the cached state; no collective on any sequence axis."""
        lin = call.linear
        q, k = params.feature_map(lin.feature_map, q), params.feature_map(lin.feature_map, k)
        out, state = linear_attention_step(entry, q[:, 0], k[:, 0], v[:, 0],
                                           log_decay=params.log_decay(),
                                           normalize=lin.normalize)
        return out[:, None], state

    def _run(self, q, k, v, call, ctx, params, return_state, segment_ids=None):
        lin = call.linear
        q, k = params.feature_map(lin.feature_map, q), params.feature_map(lin.feature_map, k)
        options = dict(log_decay=params.log_decay(), normalize=lin.normalize,
                       chunk_size=lin.chunk_size, return_state=return_state,
                       segment_ids=segment_ids)
        if not _sharded(ctx):
            return linear_attention(q, k, v, **options)
        axis = ctx.strategy_axis(call.name, 0)  # one axis, or two as under usp
        return attention_in_layout_linear(q, k, v, mesh=ctx.mesh, axis=axis,
                                          layout=call.layout, rules=ctx.activation_rules,
                                          **options)


ADAPTERS = {"local": LocalAdapter(), "strategy": StrategyAdapter(), "linear": LinearAdapter()}


def adapter(name: str):
    """The adapter for the registry entry `name`; a ValueError lists the known names."""
    kind = registry.get(name, where=" in config.model.attention").kind
    if kind == "sparse":
        from lca.models.sparse import SparseAdapter  # noqa: PLC0415 (lca.sparse imports lca)
        return SparseAdapter(name)
    return ADAPTERS[kind]
