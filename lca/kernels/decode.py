"""Decoding against a KV cache: one new query per sequence, the cache on one device or sharded.

Dimension legend: B batch, H query heads, K kv heads (G = H / K query heads
share one), D head_dim, C cache capacity (slots), S = C / n the slots one of
the n cache shards holds.

The cache is a fixed-capacity buffer of K/V slots (after RoPE), each with the
global position of its token; a slot not yet written holds position `EMPTY`,
which no query sees (it is above every position). Slots fill in order on
every shard, so a shard's used slots are a prefix of its S.

Where tokens go. Prefill leaves shard r holding its own P / n prompt tokens
in layout order (exactly as the training kernels left them: no gather, no
reshuffle), then empty slots. Token i of those that come after prefill
(i = 0, 1, ...: the rest of the prompt, then generated ones) goes to shard
i mod n, slot P / n + i // n, so shards fill evenly (`slot_of`).

  attend_slice  the decode local kernel: the new queries against one slice of
                the cache, tile by tile over its used prefix only (a dynamic
                trip count: empty tiles are never read), the G query heads of a
                group sharing each K/V tile (K/V are never repeated). Returns
                the normalised partial output and its log-sum-exp, float32.
  merge_shards  the exact merge of every shard's partial (as Tree Attention,
                arXiv 2408.04093, merges them): one all-reduce max of the
                log-sum-exps [B, H], then one all-reduce sum of the weighted
                outputs with their weights [B, H, D + 1], float32. What it
                moves does not depend on the cache length.
  attend_cache  one decode step of one layer: writes the new token's K/V into
                the shard whose turn it is and attends (inside `jax.shard_map`
                over the cache's sequence axes on a mesh).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from lca.kernels import vma
from lca.kernels.masks import _BIG

EMPTY = _BIG          # the position of a slot not yet written
DEFAULT_BLOCK = 256   # cache slots per tile of `attend_slice`
F32 = jnp.float32


def local_capacity(needed: int, shards: int, block: int = DEFAULT_BLOCK) -> tuple[int, int]:
    """(slots per shard, tile) for a cache of at least `needed` slots over `shards`: the
    slots per shard rounded up to a whole number of tiles (the tile at most `block`)."""
    per_shard = -(-needed // shards)
    tile = min(block, per_shard)
    return -(-per_shard // tile) * tile, tile


def slot_of(index, prefilled, shards):
    """(shard, slot on that shard) of the token at sequence index `index` >= `prefilled`."""
    i = index - prefilled
    return i % shards, prefilled // shards + i // shards


def used_slots(shard, length, prefilled, shards):
    """Slots in use on `shard` once the cache holds `length` tokens."""
    after = jnp.maximum(length - prefilled - shard + shards - 1, 0) // shards
    return prefilled // shards + after


def attend_slice(q_BTHD, k_BSKD, v_BSKD, kv_pos_S, q_pos_T, used, *, window=None, scale=None,
                 block=DEFAULT_BLOCK):
    """Queries against the used prefix of one cache slice: (out [B, T, H, D], lse [B, T, H]).

    q: [B, T, H, D] (T a few new tokens, usually 1); k, v: [B, S, K, D], S a
    multiple of min(block, S); kv_pos_S, q_pos_T: int32 global positions
    (`EMPTY` for unused slots); used: int32 scalar, the slots in use (only the
    tiles holding them are read). Causal by position, and within `window`
    when given. float32 results (float64 for float64 inputs); a query that
    sees no key gets out 0 and lse -inf.
    """
    b, t, h, d = q_BTHD.shape
    s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
    g = h // kh
    tile = min(block, s)
    if s % tile:
        raise ValueError(f"cache slice of {s} slots is not a whole number of {tile}-slot tiles")
    acc = jnp.promote_types(q_BTHD.dtype, F32)
    scale = d ** -0.5 if scale is None else scale
    q = (q_BTHD.astype(acc) * scale).reshape(b, t, kh, g, d)
    qp = jnp.asarray(q_pos_T, jnp.int32)

    def step(i, carry):
        m, l, o = carry
        kt = lax.dynamic_slice_in_dim(k_BSKD, i * tile, tile, axis=1).astype(acc)
        vt = lax.dynamic_slice_in_dim(v_BSKD, i * tile, tile, axis=1).astype(acc)
        pt = lax.dynamic_slice_in_dim(kv_pos_S, i * tile, tile)
        logits = jnp.einsum("btkgd,bskd->btkgs", q, kt)
        ok = pt[None, :] <= qp[:, None]                        # [T, tile]
        if window is not None:
            ok &= qp[:, None] - pt[None, :] < window
        logits = jnp.where(ok[None, :, None, None, :], logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(logits - safe[..., None])
        corr = jnp.exp(m - safe)
        l = corr * l + p.sum(-1)
        o = corr[..., None] * o + jnp.einsum("btkgs,bskd->btkgd", p, vt)
        return m_new, l, o

    init = vma.like((jnp.full((b, t, kh, g), -jnp.inf, acc), jnp.zeros((b, t, kh, g), acc),
                     jnp.zeros((b, t, kh, g, d), acc)), q, k_BSKD, v_BSKD, kv_pos_S, qp)
    m, l, o = lax.fori_loop(0, (used + tile - 1) // tile, step, init)
    out = o / jnp.where(l == 0, 1, l)[..., None]
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1)), -jnp.inf)
    return out.reshape(b, t, h, d), lse.reshape(b, t, h)


def merge_shards(out, lse, axis_names):
    """The exact softmax over every shard's keys from their partials (out [..., D], lse [...]):
    an all-reduce max over `axis_names`, then one all-reduce sum of [w out, w], float32."""
    if not axis_names:
        return out
    top = lax.pmax(lse, axis_names)
    w = jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0))
    total = lax.psum(jnp.concatenate([out * w[..., None], w[..., None]], axis=-1), axis_names)
    return total[..., :-1] / jnp.where(total[..., -1:] == 0, 1, total[..., -1:])


def write(buf, row, index, prefilled, shard, shards, axis=1):
    """`buf` with `row` (one slot's worth, along `axis`) written where token `index` goes,
    if that is on `shard`; one slot read and written either way."""
    owner, slot = slot_of(index, prefilled, shards)
    old = lax.dynamic_slice_in_dim(buf, slot, 1, axis=axis)
    new = jnp.where(owner == shard, row.astype(buf.dtype), old)
    return lax.dynamic_update_slice_in_dim(buf, new, slot, axis=axis)


def _shard_index(axis_names):
    return lax.axis_index(axis_names) if axis_names else 0


def _shard_step(q, k_new, v_new, k_cache, v_cache, kv_pos, length, prefilled, *, axis_names,
                shards, window, scale, block, gather):
    """One shard: write the token at index `length`, attend its query to this slice, merge
    (or, with `gather`, the baseline: all-gather every slice and attend to all of it)."""
    r = _shard_index(axis_names)
    k_cache = write(k_cache, k_new, length, prefilled, r, shards)
    v_cache = write(v_cache, v_new, length, prefilled, r, shards)
    if gather and axis_names:
        whole = [lax.all_gather(x, axis_names, axis=a, tiled=True)
                 for x, a in ((k_cache, 1), (v_cache, 1), (kv_pos, 0))]
        out, _ = attend_slice(q, *whole, length[None], whole[0].shape[1], window=window,
                              scale=scale, block=block)
        return out.astype(q.dtype), k_cache, v_cache
    out, lse = attend_slice(q, k_cache, v_cache, kv_pos, length[None], used_slots(
        r, length + 1, prefilled, shards), window=window, scale=scale, block=block)
    return merge_shards(out, lse, axis_names).astype(q.dtype), k_cache, v_cache


def attend_cache(q, k_new, v_new, k_cache, v_cache, positions, length, prefilled, *,
                 window=None, scale=None, block=DEFAULT_BLOCK, mesh=None, axes=(),
                 specs=None, gather=False):
    """One decode step of one softmax layer: (out [B, 1, H, D], k_cache, v_cache).

    q: [B, 1, H, D], k_new, v_new: [B, 1, K, D], the new token at sequence
    index (and position) `length`, which `positions` [C] already holds;
    k_cache, v_cache [B, C, K, D]; length, prefilled: int32 scalars. With a
    mesh, the cache is sharded over the mesh axes `axes` (ring-major) and
    `specs` = (q spec, new k/v spec, cache spec) place batch and heads; the
    token's q/k/v are replicated over `axes`. Nothing of the cache moves: each shard
    writes the token if it is its turn, attends to its own used slots, and
    `merge_shards` combines them. gather=True is the baseline the benchmarks
    compare with: every shard all-gathers the whole cache each step and
    attends to all of it (its output is replicated, not merged).
    """
    if mesh is None or not axes:
        return _shard_step(q, k_new, v_new, k_cache, v_cache, positions, length, prefilled,
                           axis_names=(), shards=1, window=window, scale=scale, block=block,
                           gather=False)
    shards = 1
    for a in axes:
        shards *= mesh.shape[a]
    q_spec, kv_spec, cache_spec = specs
    fn = functools.partial(_shard_step, axis_names=tuple(axes), shards=shards, window=window,
                           scale=scale, block=block, gather=gather)
    return jax.shard_map(
        fn, mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, cache_spec, cache_spec, P(tuple(axes)), P(), P()),
        out_specs=(q_spec, cache_spec, cache_spec),
        check_vma=not gather)(  # an all-gather's result types as varying; it is replicated
            q, k_new, v_new, k_cache, v_cache, positions, length, prefilled)


def write_position(positions, length, prefilled, *, mesh=None, axes=()):
    """`positions` [C] with the token at index `length` recorded at its slot (position =
    index), on the shard whose turn it is."""
    if mesh is None or not axes:
        return write(positions, length[None], length, prefilled, 0, 1, axis=0)
    shards = 1
    for a in axes:
        shards *= mesh.shape[a]

    def fn(pos, length, prefilled):
        return write(pos, length[None], length, prefilled, _shard_index(tuple(axes)), shards,
                     axis=0)

    return jax.shard_map(fn, mesh=mesh, in_specs=(P(tuple(axes)), P(), P()),
                         out_specs=P(tuple(axes)))(positions, length, prefilled)
