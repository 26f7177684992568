"""Sparse causal attention by permuting tokens: hash buckets and query/key dropping.

Dimension legend: B batch, T query length, S key length, H query heads,
K kv heads (G = H / K query heads share one), D head_dim, C kept slots.

Both are exact attention under a sparser mask, computed by a local kernel of
the registry on a permuted copy of the tokens, as *Faster Causal Attention
Over Large Sequences Through Sparse Flash Attention* (Pagliardini et al.,
2023) computes them with a flash kernel that skips blocks:

  bucketed  query i sees key j iff pos_j <= pos_i and they share a bucket
            (and a document, with segment ids). Each head's tokens are stably
            sorted by bucket, so positions travel with them and the bucket is
            the segment id: the kernel skips every tile pair whose bucket or
            position ranges cannot meet.
  dropped   dropped queries output zeros (and get no gradient), dropped keys
            are invisible. Each head's kept tokens are compacted, in order, into
            C slots (static shapes) with their positions; the kernel runs on C
            tokens instead of T.

The G query heads of a kv head are laid end to end as one query sequence
against that kv head's keys (K/V are never repeated), and each (batch, kv
head) is one kernel call (`lax.map`), so its tiles are skipped by its own
buckets. Results are scattered back to natural order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lca.attention import attention
from lca.kernels import local as local_lib
from lca.kernels import registry
from lca.kernels.masks import _BIG
from lca.kernels.validation import check_attention_args

INVISIBLE_Q, INVISIBLE_K = -1, -2  # segment ids of empty slots: they never meet


def _check_ids(name, ids, shape, kinds="integer"):
    if tuple(np.shape(ids)) not in [tuple(s) for s in shape]:
        want = " or ".join(str(tuple(s)) for s in shape)
        raise ValueError(f"{name} must have shape {want}; got {tuple(np.shape(ids))}")
    dtype = np.dtype(ids.dtype) if hasattr(ids, "dtype") else np.asarray(ids).dtype
    ok = jnp.issubdtype(dtype, jnp.bool_) if kinds == "bool" else jnp.issubdtype(
        dtype, jnp.integer)
    if not ok:
        raise ValueError(f"{name} must be {'a bool' if kinds == 'bool' else 'an integer'}"
                         f" array; got {dtype}")


def hash_buckets(x_BTHD, num_buckets: int, key):
    """Angular LSH: int32 [B, T, H], argmax([x R, -x R]) for a random rotation R per head.

    x: [B, T, H, D] (queries or keys); num_buckets >= 1 (one bucket: all 0);
    key: a `jax.random.key`. Tokens close in angle share a bucket with high
    probability (Andoni et al., 2015, as Reformer and the paper use it).
    """
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)) \
            or num_buckets < 1:
        raise ValueError(f"num_buckets must be an integer >= 1; got {num_buckets!r}")
    if np.ndim(x_BTHD) != 4:
        raise ValueError(f"x must be [batch, len, heads, head_dim]; got {np.shape(x_BTHD)}")
    h, d = x_BTHD.shape[2], x_BTHD.shape[3]
    rotation = rotation_for(key, h, d, num_buckets)
    return buckets_from(x_BTHD, rotation, num_buckets)


def rotation_for(key, heads: int, head_dim: int, num_buckets: int):
    """float32 [H, D, ceil(num_buckets / 2)]: the random projections of `hash_buckets`."""
    return jax.random.normal(key, (heads, head_dim, -(-num_buckets // 2)), jnp.float32)


def buckets_from(x_BTHD, rotation_HDR, num_buckets: int):
    """int32 [B, T, H]: the bucket of each token under a fixed rotation."""
    proj = jnp.einsum("bthd,hdr->bthr", x_BTHD.astype(jnp.float32), rotation_HDR)
    both = jnp.concatenate([proj, -proj], axis=-1)[..., :num_buckets]
    return jnp.argmax(both, axis=-1).astype(jnp.int32)


def _heads_first(x):
    """[B, L, H, ...] -> [B, H, L, ...]."""
    return jnp.moveaxis(x, 2, 1)


def _permuted_attention(q, k, v, q_order, q_seg, k_order, k_seg, positions, *, impl, causal,
                        scale, block_q, block_k):
    """Attention of the tokens q_order / k_order pick, per head, with those segment ids.

    q_order, q_seg: int32 [B, H, Cq] (indices into T; T for an empty slot, whose
    output is dropped); k_order, k_seg: int32 [B, K, Ck] (indices into S; S
    for an empty slot, at position +BIG: no query sees it);
    positions: int32 [B, T] and [B, S] of the tokens (natural). Returns
    [B, T, H, D]: each picked query's output at its place, zeros elsewhere.
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    q_pos, k_pos = positions
    take = lambda x, order: jnp.take_along_axis(x, jnp.minimum(order, x.shape[2] - 1)[..., None],
                                                axis=2)
    qs = take(_heads_first(q), q_order)                    # [B, H, Cq, D]
    ks, vs = take(_heads_first(k), k_order), take(_heads_first(v), k_order)
    # Empty slots: a key after every query (seen by none); a query at the position of
    # the last real query slot before it (-BIG if none: in a padded run, the run's
    # last query), so a run's padded last tile stays FULL where its real queries are. An empty query's output is dropped, so its
    # cotangent is 0 and it adds nothing to dK or dV.
    qp = jnp.where(q_order < t, jnp.take_along_axis(
        jnp.broadcast_to(q_pos[:, None], (b, h, t)), jnp.minimum(q_order, t - 1), axis=2), -_BIG)
    last = lax.cummax(jnp.where(q_order < t, jnp.arange(q_order.shape[2]), -1), axis=2)
    qp = jnp.where(last >= 0, jnp.take_along_axis(qp, jnp.maximum(last, 0), axis=2), -_BIG)
    kp = jnp.where(k_order < s, jnp.take_along_axis(jnp.broadcast_to(k_pos[:, None], (b, kh, s)),
                                                    jnp.minimum(k_order, s - 1), axis=2), _BIG)
    cq, ck = q_order.shape[2], k_order.shape[2]
    # The G heads of a kv head end to end: one [G Cq] query sequence per (batch, kv head).
    fold = lambda x: x.reshape((b * kh, g * cq) + x.shape[3:])
    flat = lambda x: x.reshape((b * kh, ck) + x.shape[3:])
    xs = (fold(qs), flat(ks), flat(vs), fold(qp), flat(kp), fold(q_seg), flat(k_seg))

    def one(x):
        qi, ki, vi, qpi, kpi, qsi, ksi = x
        return attention(qi[None, :, None], ki[None, :, None], vi[None, :, None], impl=impl,
                         causal=causal, segment_ids=qsi[None], kv_segment_ids=ksi[None],
                         positions=qpi[None], kv_positions=kpi[None], scale=scale,
                         block_q=block_q, block_k=block_k)[0, :, 0]

    out = lax.map(one, xs).reshape(b, h, cq, d)
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(h)[None, :, None]
    placed = jnp.zeros((b, h, t, d), out.dtype).at[rows, heads, q_order].add(out, mode="drop")
    return jnp.moveaxis(placed, 1, 2)


def _sorted(buckets_BHL):
    """(order, segment ids) [B, H, L]: each head's tokens stably sorted by bucket."""
    order = jnp.argsort(buckets_BHL, axis=2, stable=True).astype(jnp.int32)
    return order, jnp.take_along_axis(buckets_BHL, order, axis=2)


def _tile_aligned(buckets_BHL, num_buckets: int, tile: int):
    """(order, segment ids) [B, H, P]: sorted by bucket, each bucket's run padded to whole
    tiles (P = L + num_buckets (tile - 1), rounded up to a tile), so no tile holds two
    buckets and a tile pair of two buckets is skipped outright. Empty slots hold index L
    and the bucket of their run (num_buckets past the last)."""
    b, h, length = buckets_BHL.shape
    total = -(-(length + num_buckets * (tile - 1)) // tile) * tile
    ids = jnp.arange(num_buckets, dtype=jnp.int32)
    counts = (buckets_BHL[..., None] == ids).sum(axis=2).astype(jnp.int32)   # [B, H, nb]
    ends = jnp.cumsum(-(-counts // tile) * tile, axis=-1)
    starts = ends - -(-counts // tile) * tile
    order, seg = _sorted(buckets_BHL)
    before = jnp.cumsum(counts, axis=-1) - counts                            # tokens in lower buckets
    rank = jnp.arange(length, dtype=jnp.int32) - jnp.take_along_axis(before, seg, axis=2)
    slot = jnp.take_along_axis(starts, seg, axis=2) + rank
    rows, heads = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
    aligned = jnp.full((b, h, total), length, jnp.int32).at[rows, heads, slot].set(order)
    region = (jnp.arange(total, dtype=jnp.int32)[:, None] >= ends[..., None, :]).sum(-1)
    return aligned, region.astype(jnp.int32)


def _positions(positions, b, length, name):
    if positions is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    _check_ids(name, positions, [(length,), (b, length)])
    return jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, length))


def _kv_ids(ids, name, b, s, h, kh):
    """Per-kv-head ids [B, S, K] (per-query-head ids need K = H)."""
    _check_ids(name, ids, [(b, s, kh)] + ([(b, s, h)] if h != kh else []))
    if np.shape(ids)[2] != kh:
        raise ValueError(f"{name} of shape {np.shape(ids)} has one id per query head; keys are"
                         f" shared by the {h // kh} query heads of each of the {kh} kv heads,"
                         f" so give [batch, len, kv_heads] = {(b, s, kh)}")
    return jnp.asarray(ids)


def bucketed_attention(q, k, v, q_buckets, k_buckets, *, causal=True, segment_ids=None,
                       positions=None, num_buckets=None, impl="blockwise", scale=None,
                       block_q=None, block_k=None):
    """Causal attention within hash buckets: [B, T, H, D] in q's dtype.

    Args:
      q: [B, T, H, D]; k, v: [B, S, K, D], H % K == 0 (self-attention: S = T).
      q_buckets: int [B, T, H]; k_buckets: int [B, S, K], one bucket per token
        and (kv) head (e.g. `hash_buckets` of the queries and of the keys).
      causal: query i sees key j only if pos_j <= pos_i (and the same bucket).
      segment_ids: int [B, T] packed documents (query and key): the bucket
        then applies within a document.
      positions: int [T] or [B, T]; default arange.
      num_buckets: the buckets' count, when known (ids in 0 .. num_buckets - 1):
        each bucket's run is then padded to whole tiles, so no tile straddles
        two buckets and every tile pair of different buckets is skipped
        (without it, or with segment_ids, tiles at bucket edges are MASKED).
      impl: the local kernel (`lca.kernels.registry`); block_q / block_k its
        tiles (default the kernel's, at most T).

    A query that sees no key gets zeros. Differentiable in q, k, v.
    """
    b, t, _ = check_attention_args(q, k, v, causal=causal, segment_ids=segment_ids,
                                   positions=positions, scale=scale)
    h, kh, s = q.shape[2], k.shape[2], k.shape[1]
    if s != t:
        raise ValueError(f"bucketed attention is self-attention: k length {s} must equal q"
                         f" length {t}")
    _check_ids("q_buckets", q_buckets, [(b, t, h)])
    k_buckets = _kv_ids(k_buckets, "k_buckets", b, s, h, kh)
    q_buckets = jnp.asarray(q_buckets).astype(jnp.int32)
    k_buckets = k_buckets.astype(jnp.int32)
    if segment_ids is not None:  # (document, bucket) pairs: one id, documents major
        span = jnp.maximum(jnp.max(q_buckets), jnp.max(k_buckets)) + 1
        doc = jnp.asarray(segment_ids, jnp.int32)[..., None]
        q_buckets, k_buckets = doc * span + q_buckets, doc * span + k_buckets
    pos = _positions(positions, b, t, "positions")
    if num_buckets is not None and segment_ids is None:
        if isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)) \
                or num_buckets < 1:
            raise ValueError(f"num_buckets must be None or an integer >= 1; got {num_buckets!r}")
        default = local_lib.default_tiles(registry.local_kernel(impl), 1) or t
        block_q, block_k = (min(x or default, t) for x in (block_q, block_k))
        (q_order, q_seg), (k_order, k_seg) = (
            _tile_aligned(_heads_first(q_buckets), num_buckets, block_q),
            _tile_aligned(_heads_first(k_buckets), num_buckets, block_k))
    else:
        (q_order, q_seg), (k_order, k_seg) = (_sorted(_heads_first(q_buckets)),
                                              _sorted(_heads_first(k_buckets)))
    return _permuted_attention(q, k, v, q_order, q_seg, k_order, k_seg, (pos, pos), impl=impl,
                               causal=causal, scale=scale, block_q=block_q,
                               block_k=block_k).astype(q.dtype)


def _compact(keep_BHL, capacity):
    """(order [B, H, C]: the first C kept indices in order, L where none; kept [B, H, C])."""
    length = keep_BHL.shape[2]
    order = jnp.argsort(~keep_BHL, axis=2, stable=True)[..., :capacity].astype(jnp.int32)
    kept = jnp.take_along_axis(keep_BHL, order, axis=2)
    return jnp.where(kept, order, length), kept


def _capacity(capacity, t):
    pair = capacity if isinstance(capacity, tuple) else (capacity, capacity)
    for c in pair:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 1 <= c <= t:
            raise ValueError(f"capacity must be an int in 1 .. {t} (the length), or a pair"
                             f" (query capacity, key capacity); got {capacity!r}")
    return pair


def dropped_attention(q, k, v, q_keep, k_keep, *, capacity, causal=True, segment_ids=None,
                      positions=None, impl="blockwise", scale=None, block_q=None,
                      block_k=None, overflow="raise"):
    """Causal attention among kept queries and keys: [B, T, H, D] in q's dtype.

    Args:
      q: [B, T, H, D]; k, v: [B, T, K, D], H % K == 0.
      q_keep: bool [B, T, H]; k_keep: bool [B, T, K]: which tokens each (kv)
        head keeps.
      capacity: kept slots per head, an int or (queries, keys), 1 .. T; the
        kernel runs on these many tokens. The first `capacity` kept tokens of a
        head, in order, are attended; later kept ones are treated as dropped
        (tests/test_sparse.py checks this). overflow="raise" (the default)
        refuses concrete keep masks that keep more than that, with a
        ValueError; "drop" accepts them (a model layer's choice: the overflow
        then depends on earlier tokens only, so it stays causal).
      causal, segment_ids, positions, impl, scale, block_q, block_k: as for
        `bucketed_attention`.

    Dropped (or uncounted) queries output zeros and get zero gradient; dropped
    keys are seen by no query.
    """
    b, t, _ = check_attention_args(q, k, v, causal=causal, segment_ids=segment_ids,
                                   positions=positions, scale=scale)
    h, kh = q.shape[2], k.shape[2]
    if k.shape[1] != t:
        raise ValueError(f"dropped attention is self-attention: k length {k.shape[1]} must"
                         f" equal q length {t}")
    _check_ids("q_keep", q_keep, [(b, t, h)], kinds="bool")
    _check_ids("k_keep", k_keep, [(b, t, kh)], kinds="bool")
    cq, ck = _capacity(capacity, t)
    if overflow not in ("raise", "drop"):
        raise ValueError(f"overflow must be 'raise' or 'drop'; got {overflow!r}")
    for name, keep, c in (("q_keep", q_keep, cq), ("k_keep", k_keep, ck)):
        if overflow == "raise" and not isinstance(keep, jax.core.Tracer):
            most = int(np.asarray(keep).sum(axis=1).max())
            if most > c:
                raise ValueError(f"{name} keeps up to {most} tokens of a head, over the"
                                 f" capacity {c}; raise capacity to {most}")
    q_order, q_kept = _compact(_heads_first(jnp.asarray(q_keep)), cq)
    k_order, k_kept = _compact(_heads_first(jnp.asarray(k_keep)), ck)
    q_seg = jnp.where(q_kept, 0, INVISIBLE_Q)
    k_seg = jnp.where(k_kept, 0, INVISIBLE_K)
    if segment_ids is not None:
        doc = _heads_first(jnp.asarray(segment_ids, jnp.int32)[..., None])
        pick = lambda order, n: jnp.take_along_axis(jnp.broadcast_to(doc, (b, n, t)),
                                                    jnp.minimum(order, t - 1), axis=2)
        q_seg = jnp.where(q_kept, pick(q_order, h), INVISIBLE_Q)
        k_seg = jnp.where(k_kept, pick(k_order, kh), INVISIBLE_K)
    pos = _positions(positions, b, t, "positions")
    return _permuted_attention(q, k, v, q_order, q_seg, k_order, k_seg, (pos, pos), impl=impl,
                               causal=causal, scale=scale, block_q=block_q,
                               block_k=block_k).astype(q.dtype)
