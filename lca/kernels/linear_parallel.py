"""Causal linear attention across a mesh axis: one shard's kernel, run inside `jax.shard_map`.

Dimension legend:
  B batch (per shard), T local length, H heads, K key_dim, V value_dim (V + 1
  with normalize), n shards on the axis, r this shard's index, m segments per
  shard (1 for the contiguous layout, 2 for zigzag), Ls = T / m.

A segment is a run of tokens that is contiguous in the global order. Its
summary is a pair (Γ, S): Γ [B, H] the total log decay over the segment and
S [B, H, K, V] its state from a zero start. Pairs compose associatively, a
then b:

    (Γa, Sa) ∘ (Γb, Sb) = (Γa + Γb, exp(Γb) Sa + Sb)

and zeros are the identity, which is also what `ppermute` gives a shard that
receives nothing. The state entering a segment is the exclusive scan, in
global order, of the segments before it. Layouts, as global chunk order:

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
of [B, H, K·V + 1] buffers, independent of the sequence length:

  "allgather"  one all_gather of the m pairs (LASP-2)
  "ring"       n - 1 ppermute hops around the ring, each forwarding the raw
               pairs it received (LASP passes the state along the ring)
  "doubling"   log2(n) ppermute rounds with partner r XOR 2^d (recursive
               doubling; n a power of two)

Gradients are JAX autodiff through the collectives (a ppermute transposes to
the inverse permutation, an all_gather to a reduce-scatter), so the backward
pass moves the same number of bytes the other way.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lca.kernels import linear as linear_lib
from lca.kernels import linear_chunked

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


def _select(pred, a, b):
    return tuple(jnp.where(pred, x, y) for x, y in zip(a, b))


def _scan_allgather(pairs, axis_name, n, r):
    """One all_gather; each shard folds the pairs before its segments locally."""
    m = pairs[0].shape[0]
    kv_shape = pairs[1].shape[-2:]
    gamma, state = _unpack(lax.all_gather(_pack(pairs), axis_name), kv_shape)  # [n, m, ...]
    # Global order of the gathered segments: A_0..A_{n-1} (then B_{n-1}..B_0).
    gamma = jnp.concatenate([gamma[:, 0]] + ([gamma[::-1, 1]] if m == 2 else []))
    state = jnp.concatenate([state[:, 0]] + ([state[::-1, 1]] if m == 2 else []))
    total = gamma.shape[0]
    mine = jnp.stack([r, 2 * n - 1 - r])[:m]  # global positions of this shard's segments
    j = jnp.arange(total)
    # Exponent for segment j entering position p: sum of Γ_i over j < i < p (<= 0).
    between = (j[None, :, None] < j[None, None, :]) & (j[None, None, :] < mine[:, None, None])
    exponent = jnp.einsum("pji,ibh->pjbh", between.astype(gamma.dtype), gamma)
    weight = jnp.where((j[None, :] < mine[:, None])[..., None, None], jnp.exp(exponent), 0)
    return jnp.einsum("pjbh,jbhkv->pbhkv", weight, state)


def _scan_ring(pairs, axis_name, n, r):
    """n - 1 hops; hop h brings the raw pairs of shard (r - h) mod n.

    Sources below r arrive in decreasing order, so A_src is put in front of the
    running prefix. Sources above r arrive from n - 1 down, so the middle run
    X = A_{r+1} ∘ ... ∘ A_{n-1} ∘ B_{n-1} ∘ ... ∘ B_{r+1} grows from inside out.
    """
    m = pairs[0].shape[0]
    kv_shape = pairs[1].shape[-2:]
    own_a = (pairs[0][0], pairs[1][0])
    prefix = middle = _identity_like(own_a)
    buf = _pack(pairs)
    perm = [(i, (i + 1) % n) for i in range(n)]
    for hop in range(1, n):
        buf = lax.ppermute(buf, axis_name, perm)
        gamma, state = _unpack(buf, kv_shape)
        a = (gamma[0], state[0])
        below = (r - hop) % n < r
        prefix = _select(below, compose(a, prefix), prefix)
        if m == 2:
            grown = compose(a, compose(middle, (gamma[1], state[1])))
            middle = _select(below, middle, grown)
    incoming = [prefix[1]]
    if m == 2:
        incoming.append(compose(compose(prefix, own_a), middle)[1])
    return jnp.stack(incoming)


def _scan_doubling(pairs, axis_name, n, r):
    """log2(n) rounds of recursive doubling: exchange block totals with r XOR 2^d.

    After round d a shard knows, for its aligned block of 2^(d+1) shards, the
    A total in increasing order and the B total in decreasing order, and its
    exclusive A prefix and exclusive B suffix inside the block.
    """
    m = pairs[0].shape[0]
    kv_shape = pairs[1].shape[-2:]
    total = pairs  # [m, ...]: A (and B) totals of this shard's block
    prefix_a = suffix_b = _identity_like((pairs[0][0], pairs[1][0]))
    d = 1
    while d < n:
        gamma, state = _unpack(lax.ppermute(_pack(total), axis_name,
                                            [(i, i ^ d) for i in range(n)]), kv_shape)
        partner_below = (r & d) != 0
        own_a, got_a = (total[0][0], total[1][0]), (gamma[0], state[0])
        prefix_a = _select(partner_below, compose(got_a, prefix_a), prefix_a)
        new_a = _select(partner_below, compose(got_a, own_a), compose(own_a, got_a))
        new = [new_a]
        if m == 2:
            own_b, got_b = (total[0][1], total[1][1]), (gamma[1], state[1])
            suffix_b = _select(partner_below, suffix_b, compose(got_b, suffix_b))
            new.append(_select(partner_below, compose(own_b, got_b), compose(got_b, own_b)))
        total = tuple(jnp.stack(parts) for parts in zip(*new))
        d *= 2
    incoming = [prefix_a[1]]
    if m == 2:
        incoming.append(compose((total[0][0], total[1][0]), suffix_b)[1])
    return jnp.stack(incoming)


_SCANS = {"allgather": _scan_allgather, "ring": _scan_ring, "doubling": _scan_doubling}


def _fold_segments(x, m):
    """[B, m·Ls, ...] -> [m·B, Ls, ...], segment-major."""
    if x is None or m == 1:
        return x
    b, t = x.shape[:2]
    x = x.reshape((b, m, t // m) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((m * b, t // m) + x.shape[3:])


def _unfold_segments(x, m):
    if m == 1:
        return x
    mb, ls = x.shape[:2]
    x = x.reshape((m, mb // m, ls) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((mb // m, m * ls) + x.shape[3:])


def linear_attention_shard(q, k, v, *, axis_name, algorithm="allgather", layout="contiguous",
                           log_decay=None, normalize=False, chunk_size=64):
    """This shard's part of causal linear attention over the whole `axis_name` axis.

    Call inside `jax.shard_map`; the global sequence is the shards' local
    sequences in `layout` order. No initial or final state: the sequence
    starts from zero on shard 0's first token.

    Args:
      q, k: [B, T, H, K] local shard; v: [B, T, H, V].
      axis_name: the mesh axis that splits the sequence.
      algorithm: "allgather", "ring" or "doubling" (module docstring).
      layout: "contiguous" or "zigzag" (T even: two halves, chunks r and 2n-1-r).
      log_decay: None, [H] or [B, T, H] (this shard's tokens), <= 0.
      normalize, chunk_size: as in `lca.linear_attention`.

    Returns:
      [B, T, H, V] in q's dtype: this shard's rows of the global output.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}; got {algorithm!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)} for linear attention;"
                         f" got {layout!r}")
    b, t, h, dk, dv = linear_lib.check_linear_args(q, k, v, log_decay=log_decay,
                                                   normalize=normalize, chunk_size=chunk_size)
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

    # 1. This shard's segment summaries, then at once the collective.
    gamma, state = linear_chunked.segment_state(k, v, g, acc)
    pairs = (gamma.reshape((m, b) + gamma.shape[1:]), state.reshape((m, b) + state.shape[1:]))
    incoming = _SCANS[algorithm](pairs, axis_name, n, r)  # [m, B, H, K, V]
    # 2. The local output from a zero state: independent of the collective.
    zero = jnp.zeros((m * b,) + state.shape[1:], acc)
    num, _ = linear_chunked.chunked(q, k, v, g, zero, int(chunk_size))
    # 3. The incoming state, read through each query's decay since its segment began.
    read = jnp.einsum("bthk,bhkv->bthv", q, incoming.reshape(zero.shape),
                      preferred_element_type=acc)
    if g is not None:
        read = read * jnp.exp(jnp.cumsum(g, axis=1))[..., None]
    out = linear_lib.finish(num + read, normalize, q.dtype)
    return _unfold_segments(out, m)
