"""Causal linear attention across a mesh axis: one shard's kernel, run inside `jax.shard_map`.

Dimension legend:
  B batch (per shard), T local length, H query heads (J key/value heads,
  H % J == 0), K key_dim, V value_dim (V + 1
  with normalize), n shards on the axis, r this shard's index, m segments per
  shard (1 for the contiguous layout, 2 for zigzag), Ls = T / m.

A segment is a run of tokens that is contiguous in the global order. Its
summary is a pair (Γ, S): Γ [B, H] the total log decay over the segment and
S [B, H, K, V] its state from a zero start. Pairs compose associatively, a
then b:

    (Γa, Sa) ∘ (Γb, Sb) = (Γa + Γb, exp(Γb) Sa + Sb)

with zeros as the identity. The state entering a segment is the exclusive
scan, in global order, of the segments before it. Layouts, as global chunk order:

  contiguous  shard r holds chunk r:                     A_0 ... A_{n-1}
  zigzag      shard r holds chunks r (A_r) and 2n-1-r (B_r):
                                      A_0 ... A_{n-1} B_{n-1} ... B_0

so the state entering A_r is A_0 ∘ ... ∘ A_{r-1}, and the one entering B_r
is A_0 ∘ ... ∘ A_{n-1} ∘ B_{n-1} ∘ ... ∘ B_{r+1}.

Each shard computes its segments' (Γ, S) first (one [K, Ls] x [Ls, V]
product per head), issues the collective, then computes its local output from
a zero state, which does not depend on the collective, so the two overlap;
a correction exp(G_t) q_tᵀ S_in finishes the output (G_t the decay from the
segment's start through t). Every decay exponent is a sum of log decays,
never positive. Per shard and per call the collectives move a fixed number
of [m, B, H, K·V + 1] float32 buffers, independent of the sequence length:

  "allgather"  one all_gather of the m pairs (LASP-2); n buffers arrive
  "ring"       n - 1 ppermute hops around the ring, each forwarding the
               pairs it received (as LASP passes states along a ring), then
               the same local fold as allgather; n - 1 buffers arrive
  "doubling"   log2(n) ppermute rounds with partner r XOR 2^d (recursive
               doubling; n a power of two); log2(n) buffers arrive

Packed documents (segment_ids): the state restarts where the id changes, as
a log decay of `RESET_LOG_DECAY` at each document's first token
(`lca.kernels.linear`), so summaries, scans and corrections need nothing
else. Whether a shard's first token starts a document depends on the token
before it in global order, on another shard: one all_gather of each
segment's last id ([n, m, B] integers) settles it, before anything else.

The local work around the collective, and its backward, are
`lca.kernels.linear_shard.local_and_exchange`: a written-out backward that
holds one gradient buffer per input (autodiff of the three scans held two or
three), with JAX's vjp of the collective inside it (a ppermute transposes to
the inverse permutation, an all_gather to a reduce-scatter), so the backward
pass moves the same number of bytes the other way.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from lca.kernels import linear as linear_lib
from lca.kernels import linear_shard

ALGORITHMS = ("ring", "allgather", "doubling")
LAYOUTS = ("contiguous", "zigzag")


def compose(a, b):
    """a then b, for (Γ [..., B, H], S [..., B, H, K, V]) pairs."""
    (ga, sa), (gb, sb) = a, b
    return ga + gb, jnp.exp(gb)[..., None, None] * sa + sb


def _pack(pair):
    """(Γ [..., H], S [..., H, K, V]) -> one [..., H, K·V + 1] buffer for the wire."""
    gamma, state = pair
    flat = state.reshape(state.shape[:-2] + (-1,))
    return jnp.concatenate([gamma[..., None], flat], axis=-1)


def _unpack(buf, kv_shape):
    return buf[..., 0], buf[..., 1:].reshape(buf.shape[:-1] + kv_shape)


def _identity_like(pair):
    return tuple(jnp.zeros_like(x) for x in pair)


def _positions(shard, n, m):
    """Global positions of a shard's m segments: r, and 2n-1-r for zigzag's second."""
    return jnp.stack([shard, 2 * n - 1 - shard])[:m]


def _fold(gamma, state, position, mine):
    """Exclusive prefixes, in global order, at the positions `mine` [m].

    gamma [E, B, H] and state [E, B, H, K, V] are E segment summaries in any
    order, at global positions `position` [E]. Segment j enters position p with
    weight exp(sum of Γ_i over p_j < p_i < p), a masked sum of log decays.
    """
    before = position[None, :] < mine[:, None]  # [m, E]
    between = ((position[:, None] < position[None, :])[None]
               & (position[None, None, :] < mine[:, None, None]))  # [m, j, i]
    exponent = jnp.einsum("pji,ibh->pjbh", between.astype(gamma.dtype), gamma)
    weight = jnp.where(before[..., None, None], jnp.exp(exponent), 0)
    return jnp.einsum("pjbh,jbhkv->pbhkv", weight, state)


def _scan_allgather(pairs, axis_name, n, r):
    """One all_gather of every shard's summaries; each shard folds what precedes it."""
    m = pairs[0].shape[0]
    gamma, state = _unpack(lax.all_gather(_pack(pairs), axis_name), pairs[1].shape[-2:])
    position = _positions(jnp.arange(n), n, m).T.reshape(-1)  # [n * m], shard-major
    flat = lambda x: x.reshape((n * m,) + x.shape[2:])
    return _fold(flat(gamma), flat(state), position, _positions(r, n, m))


def _scan_ring(pairs, axis_name, n, r):
    """n - 1 ppermute hops around the ring, each forwarding the summaries it received.

    Hop h brings shard (r - h) mod n's summaries; the shard then folds all n as
    `_scan_allgather` does. The hops carry no compute between them.
    """
    m = pairs[0].shape[0]
    bufs = [_pack(pairs)]
    perm = [(i, (i + 1) % n) for i in range(n)]
    for _ in range(1, n):
        bufs.append(lax.ppermute(bufs[-1], axis_name, perm))
    gamma, state = _unpack(jnp.stack(bufs), pairs[1].shape[-2:])  # [n, m, ...] by hop
    source = (r - jnp.arange(n)) % n
    position = _positions(source, n, m).T.reshape(-1)
    flat = lambda x: x.reshape((n * m,) + x.shape[2:])
    return _fold(flat(gamma), flat(state), position, _positions(r, n, m))


def _scan_doubling(pairs, axis_name, n, r):
    """log2(n) rounds of recursive doubling: exchange block totals with r XOR 2^d.

    After the round with offset d a shard knows, for its aligned block of 2d
    shards, each segment's total in that segment's global order (A: shards
    ascending; B: descending) and its exclusive prefix in that order inside
    the block. The partner's block precedes ours for A when the partner is
    below, and for B when it is above.
    """
    m = pairs[0].shape[0]
    total = pairs  # [m, ...]
    prefix = _identity_like(pairs)
    d = 1
    while d < n:
        got = _unpack(lax.ppermute(_pack(total), axis_name, [(i, i ^ d) for i in range(n)]),
                      pairs[1].shape[-2:])
        below = (r & d) != 0
        precedes = jnp.stack([below, ~below])[:m]  # [m]: the partner's block comes first
        per_segment = lambda x: precedes.reshape((m,) + (1,) * (x.ndim - 1))
        prefix = compose(tuple(x * per_segment(x) for x in got), prefix)
        first = tuple(jnp.where(per_segment(x), x, y) for x, y in zip(got, total))
        second = tuple(jnp.where(per_segment(x), y, x) for x, y in zip(got, total))
        total = compose(first, second)
        d *= 2
    incoming = [prefix[1][0]]
    if m == 2:  # B_r follows every A and the Bs above it
        incoming.append(compose((total[0][0], total[1][0]), (prefix[0][1], prefix[1][1]))[1])
    return jnp.stack(incoming)


_SCANS = {"allgather": _scan_allgather, "ring": _scan_ring, "doubling": _scan_doubling}


def _fold_segments(x, m):
    """[B, m·Ls, ...] -> [B·m, Ls, ...]: row b·m + i is row b's segment i (a free reshape)."""
    if x is None or m == 1:
        return x
    b, t = x.shape[:2]
    return x.reshape((b * m, t // m) + x.shape[2:])


def _unfold_segments(x, m):
    """The inverse of `_fold_segments` (a free reshape)."""
    if m == 1:
        return x
    bm, ls = x.shape[:2]
    return x.reshape((bm // m, m * ls) + x.shape[2:])


def _by_segment(x, m):
    """[B·m, ...] -> [m, B, ...] (small per-segment arrays: pairs, states, ids)."""
    return jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)


def _from_segments(x):
    """The inverse of `_by_segment`: [m, B, ...] -> [B·m, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _starts(segment_ids, axis_name, n, r, m):
    """[B·m, Ls] ids of this shard's segments -> [B·m, Ls] bool document starts.

    The first token of the segment at global position p starts a document when its
    id differs from the last id of the segment at p - 1 (p = 0: never).
    """
    last = lax.all_gather(_by_segment(segment_ids[:, -1], m), axis_name)  # [n, m, B]
    where = _positions(jnp.arange(n), n, m).T.reshape(-1)  # [n * m], shard-major
    by_position = jnp.zeros_like(last.reshape(n * m, -1)).at[where].set(
        last.reshape(n * m, -1))
    mine = _positions(r, n, m)  # [m]
    before = by_position[jnp.maximum(mine - 1, 0)]  # [m, B]
    first = (mine[:, None] > 0) & (_by_segment(segment_ids[:, 0], m) != before)
    return linear_lib.document_starts(segment_ids, _from_segments(first))


def linear_attention_shard(q, k, v, *, axis_name, algorithm="allgather", layout="contiguous",
                           log_decay=None, normalize=False, chunk_size=64, return_state=False,
                           segment_ids=None):
    """This shard's part of causal linear attention over the whole `axis_name` axis.

    Call inside `jax.shard_map`; the global sequence is the shards' local
    sequences in `layout` order. No initial or final state: the sequence
    starts from zero on shard 0's first token.

    Args:
      q: [B, T, H, K], k: [B, T, J, K], v: [B, T, J, V] local shard, H % J == 0
        (grouped-query heads, never repeated).
      axis_name: the mesh axis that splits the sequence.
      algorithm: "allgather", "ring" or "doubling" (module docstring).
      layout: "contiguous" or "zigzag" (T even: two halves, chunks r and 2n-1-r).
      log_decay: None, [H] or [B, T, H] (this shard's tokens), <= 0.
      normalize, chunk_size: as in `lca.linear_attention`.
      segment_ids: int [B, T] this shard's document ids (global layout-order
        ids): the state restarts where the id changes in global order, across
        chunks and shards; None: one document.
      return_state: also return the state after the last token of the whole
        sequence, [B, H, K, V] ([B, H, K, V + 1] with normalize), float32, the
        same on every shard (one all-reduce sum: only the shard holding the
        last segment contributes); a decoding cache starts from it.

    Returns:
      [B, T, H, V] in q's dtype: this shard's rows of the global output (and
      with return_state the final state).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}; got {algorithm!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)} for linear attention;"
                         f" got {layout!r}")
    b, t, h, dk, dv = linear_lib.check_linear_args(q, k, v, log_decay=log_decay,
                                                   normalize=normalize, chunk_size=chunk_size,
                                                   segment_ids=segment_ids)
    n = lax.axis_size(axis_name)
    if algorithm == "doubling" and n & (n - 1):
        raise ValueError(f"algorithm='doubling' needs a power-of-two number of shards on"
                         f" axis {axis_name!r}; got {n}. Use 'allgather' or 'ring'.")
    m = 2 if layout == "zigzag" else 1
    if t % m:
        raise ValueError(f"layout='zigzag' needs an even local length; got {t}")
    r = lax.axis_index(axis_name)
    acc = linear_lib.compute_dtype(q.dtype)
    g = linear_lib.per_token_log_decay(log_decay, b, t, h, acc)
    if normalize:
        v = linear_lib.with_key_sum_column(v)
    q, k, v, g = (_fold_segments(x, m) for x in (q, k, v, g))
    if segment_ids is not None:
        starts = _starts(_fold_segments(segment_ids, m), axis_name, n, r, m)
        g = linear_lib.with_resets(g, starts, h, acc)

    exchange = functools.partial(_exchange, axis_name=axis_name, algorithm=algorithm, m=m)
    x, incoming, pairs = linear_shard.local_and_exchange(q, k, v, g, exchange,
                                                         int(chunk_size))
    out = _unfold_segments(linear_lib.finish(x, normalize, q.dtype), m)
    if not return_state:
        return out
    # The last segment in global order: shard n-1's only one, or zigzag's B_0 on shard 0.
    gamma_last, state_last, incoming_last = (_by_segment(x, m)[m - 1]
                                             for x in (*pairs, incoming))
    final = jnp.exp(gamma_last)[..., None, None] * incoming_last + state_last
    owner = (n - 1) if m == 1 else 0
    return out, lax.psum(jnp.where(r == owner, final, 0), axis_name)


def _exchange(pairs, *, axis_name, algorithm, m):
    """(Γ [B·m, H], S [B·m, H, K, V]) of this shard's segments -> the state entering each,
    [B·m, H, K, V], by `algorithm` over `axis_name`."""
    n, r = lax.axis_size(axis_name), lax.axis_index(axis_name)
    by_segment = tuple(_by_segment(x, m) for x in pairs)
    return _from_segments(_SCANS[algorithm](by_segment, axis_name, n, r))
