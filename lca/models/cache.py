"""The inference path of a `Transformer`: prefill into a cache, decode one token at a time.

Dimension legend: B batch, T prompt length, C cache capacity (slots), E embed,
K kv heads, D head_dim, H heads, V vocab; n the cache's shards (every
sequence shard of the mesh; 1 on one device).

    logits_BV, cache = model.prefill(tokens_BT, capacity=C, ctx=ctx)
    logits_BV, cache = model.decode(cache, tokens_B, ctx=ctx)      # again and again

Prefill runs the prompt through the layers' own kernels (the ring, all-gather,
Ulysses... on a mesh, their local kernel on one device) in the model's layout
and keeps, per softmax layer, K/V after RoPE, and per linear layer its final
state. On a mesh the K/V stay where prefill computed them: shard r's slice
of the cache is its own prompt tokens in layout order, then empty slots (the
placement `lca.kernels.decode` describes; nothing is gathered or moved).
Decode writes each new token on the shard whose turn it is and merges the
shards' partial attention with one reduction; linear layers step their state
(replicated over the sequence axes) with no collective.

The capacity is fixed at prefill (one compiled decode step per capacity);
`lca.generate` checks that prompt and steps fit before it starts.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lca import layouts
from lca.kernels import decode as decode_lib
from lca.kernels import registry
from lca.parallel.sequence import check_length
from lca.parallel.sharding import ShardingContext, activation_spec

F32 = jnp.float32


def mesh_key(ctx: ShardingContext | None):
    """What a cache remembers of the mesh it was sharded on (None: one device)."""
    if ctx is None or ctx.mesh is None:
        return None
    mesh = ctx.mesh
    return (tuple(mesh.axis_names), tuple(mesh.devices.shape),
            tuple(int(d.id) for d in mesh.devices.flat), tuple(ctx.activation_rules))


@dataclasses.dataclass(frozen=True)
class CacheMeta:
    """The static half of a cache: which model and mesh it is for, and its geometry."""

    model: object            # the ModelConfig it was made for
    mesh: tuple | None       # `mesh_key` of the mesh it is sharded on
    capacity: int            # C slots in all, C / shards per shard
    shards: int              # n
    tile: int                # slots per tile of the decode kernel
    batch: int


class CacheView(NamedTuple):
    """What a layer's decode needs of the cache besides its own entry."""

    positions: jax.Array     # int32 [C], this step's token already recorded
    length: jax.Array        # int32 []: the new token's index (= its position)
    prefilled: jax.Array     # int32 []
    tile: int
    gather: bool = False     # the all-gathered-cache baseline (`decode.attend_cache`)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """A model's inference state (a pytree; `meta` is static).

    layers: per layer, (k, v) [B, C, K, D] in the activation dtype for a
      softmax layer, or the float32 state [B, H, D, D] ([B, H, D, D + 1]
      with normalize) of a linear one.
    positions: int32 [C], each slot's token position (`decode.EMPTY` if unused).
    length: int32 [], tokens in the cache; prefilled: int32 [], those prefill wrote.
    """

    layers: tuple
    positions: jax.Array
    length: jax.Array
    prefilled: jax.Array
    meta: CacheMeta = dataclasses.field(metadata=dict(static=True))


def shards_of(ctx: ShardingContext | None) -> int:
    return 1 if ctx is None or ctx.mesh is None else ctx.total_sequence_shards


def geometry(capacity: int, ctx: ShardingContext | None) -> tuple[int, int]:
    """(slots per shard, tile) of a cache of at least `capacity` slots on ctx's mesh."""
    return decode_lib.local_capacity(capacity, shards_of(ctx))


def _meta(model, ctx, capacity, batch) -> CacheMeta:
    per_shard, tile = geometry(capacity, ctx)
    n = shards_of(ctx)
    return CacheMeta(model.config, mesh_key(ctx), per_shard * n, n, tile, batch)


def _sharded(ctx):
    return shards_of(ctx) > 1


def _place(x, logical, ctx, sequence=True):
    """A sharding constraint by logical names (length over every sequence axis)."""
    if not _sharded(ctx):
        return x
    axes = ctx.sequence_axes if sequence else None
    spec = activation_spec(logical, ctx.activation_rules, ctx.mesh, x.shape, axes)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


KV = ("batch", "length", "kv_heads", "head_dim")
STATE = ("batch", "heads", None, None)


def _pad_shards(x, per_shard, ctx):
    """[B, T, ...] sharded over the sequence axes -> [B, n per_shard, ...]: each shard's
    tokens, then zeros, on the shard that holds them (no communication)."""
    pad = lambda a: jnp.pad(a, [(0, 0), (0, per_shard - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    if not _sharded(ctx):
        return pad(x)
    spec = activation_spec(KV, ctx.activation_rules, ctx.mesh, x.shape, ctx.sequence_axes)
    return jax.shard_map(pad, mesh=ctx.mesh, in_specs=spec, out_specs=spec)(x)


def slot_positions(positions_T: np.ndarray, per_shard: int, shards: int) -> np.ndarray:
    """int32 [n per_shard]: each shard's prompt positions, then EMPTY."""
    out = np.full((shards, per_shard), decode_lib.EMPTY, np.int32)
    held = np.asarray(positions_T, np.int32).reshape(shards, -1)
    out[:, :held.shape[1]] = held
    return out.reshape(-1)


def prefill(model, tokens_BT, capacity: int, ctx: ShardingContext | None = None):
    """(float32 logits of the last prompt token [B, V], Cache) for a prompt in natural order.

    On a mesh T must split over its sequence shards in the model's layout
    (`lca.parallel.sequence.check_length`; a ValueError gives the nearest
    lengths); `lca.generate` prefills the longest such prefix and decodes the
    rest of the prompt. capacity: slots for prompt and every token to come
    (rounded up to whole tiles per shard).
    """
    cfg = model.config
    b, t = tokens_BT.shape
    meta = _meta(model, ctx, max(capacity, t), b)
    per_shard = meta.capacity // meta.shards
    if _sharded(ctx):
        n = ctx.sequence_shards
        check_length(t, cfg.layout, n, meta.shards)
        order = layouts.positions(t, cfg.layout, n)
        tokens_BT = jnp.asarray(tokens_BT)[:, order]
        positions = jnp.broadcast_to(jnp.asarray(order), (b, t))
        mask_positions = positions
    else:
        order = np.arange(t, dtype=np.int32)
        positions, mask_positions = jnp.broadcast_to(jnp.arange(t), (b, t)), None
    x = _place(model.embed_tokens(tokens_BT), ("batch", "length", "embed"), ctx)
    layers = []
    for block in model.blocks:
        x, entry = block.prefill(x, positions, mask_positions, ctx)
        if isinstance(entry, tuple):  # K/V: kept where they are, padded to the capacity
            entry = tuple(_place(_pad_shards(a, per_shard, ctx), KV, ctx) for a in entry)
        else:
            entry = _place(entry, STATE, ctx, sequence=False)
        layers.append(entry)
    last = int(np.argmax(order == t - 1))  # where the last token sits in layout order
    logits = model.logits(x[:, last:last + 1], None)[:, 0]
    slots = _place(jnp.asarray(slot_positions(order, per_shard, meta.shards)), ("length",), ctx)
    return logits, Cache(tuple(layers), slots, jnp.int32(t), jnp.int32(t), meta)


def empty(model, batch: int, capacity: int, ctx: ShardingContext | None = None) -> Cache:
    """A cache holding no token yet (decode then takes the prompt one token at a time)."""
    cfg = model.config
    meta = _meta(model, ctx, capacity, batch)
    dtype = jnp.dtype(cfg.dtype)
    layers = []
    for block in model.blocks:
        attn = block.attn
        if registry.get(attn.call.name).kind == "linear":
            lin = cfg.linear
            probe = jax.ShapeDtypeStruct((batch, 1, cfg.heads, cfg.head_dim), dtype)
            features = jax.eval_shape(
                lambda q, p=attn.kernel_params: p.feature_map(lin.feature_map, q), probe)
            state = jnp.zeros((batch, cfg.heads, features.shape[-1],
                               cfg.head_dim + int(lin.normalize)), F32)
            layers.append(_place(state, STATE, ctx, sequence=False))
        else:
            kv = jnp.zeros((batch, meta.capacity, cfg.kv_heads, cfg.head_dim), dtype)
            layers.append((_place(kv, KV, ctx), _place(kv, KV, ctx)))
    slots = jnp.full((meta.capacity,), decode_lib.EMPTY, jnp.int32)
    return Cache(tuple(layers), _place(slots, ("length",), ctx), jnp.int32(0), jnp.int32(0),
                 meta)


def check(cache: Cache, model, ctx: ShardingContext | None):
    """A ValueError unless `cache` was made for this model's configuration and this mesh."""
    if not isinstance(cache, Cache):
        raise ValueError(f"decode takes the Cache that prefill returned; got"
                         f" {type(cache).__name__}")
    if cache.meta.model != model.config:
        diff = [f"{f.name}: cache {getattr(cache.meta.model, f.name)!r} vs model"
                f" {getattr(model.config, f.name)!r}" for f in dataclasses.fields(model.config)
                if getattr(cache.meta.model, f.name, None) != getattr(model.config, f.name)]
        raise ValueError(f"this cache was made for another model configuration ({'; '.join(diff)})")
    if cache.meta.mesh != mesh_key(ctx):
        show = lambda k: "one device" if k is None else f"mesh {dict(zip(k[0], k[1]))}" + (
            "" if k is None else f" on devices {list(k[2])}")
        raise ValueError(f"this cache is sharded for {show(cache.meta.mesh)}, but decode runs"
                         f" on {show(mesh_key(ctx))}; decode on the mesh prefill used")


def decode(model, cache: Cache, tokens_B, ctx: ShardingContext | None = None, *,
           gather_cache: bool = False):
    """(float32 logits [B, V] of the next token, the cache with `tokens_B` appended).

    gather_cache: the baseline that all-gathers each layer's cache every step
    instead of merging the shards' partials (benchmarks compare the two).

    tokens_B: int [B], the token at sequence index `cache.length`. Under jit
    the capacity cannot be checked: a cache that is full is overwritten in its
    last slots, so callers check `cache.length < cache.meta.capacity` (as
    `lca.generate` does before it starts).
    """
    check(cache, model, ctx)
    if tuple(np.shape(tokens_B)) != (cache.meta.batch,):
        raise ValueError(f"decode takes one token per sequence of the cache's batch, shape"
                         f" ({cache.meta.batch},); got shape {tuple(np.shape(tokens_B))}")
    axes = ctx.sequence_axes if _sharded(ctx) else ()
    mesh = ctx.mesh if _sharded(ctx) else None
    positions = decode_lib.write_position(cache.positions, cache.length, cache.prefilled,
                                          mesh=mesh, axes=axes)
    view = CacheView(positions, cache.length, cache.prefilled, cache.meta.tile, gather_cache)
    x = model.embed_tokens(jnp.asarray(tokens_B)[:, None])
    layers = []
    for block, entry in zip(model.blocks, cache.layers):
        x, entry = block.decode(x, entry, view, ctx)
        layers.append(entry)
    logits = model.logits(x, ctx)[:, 0]
    return logits, Cache(tuple(layers), positions, cache.length + 1, cache.prefilled, cache.meta)
