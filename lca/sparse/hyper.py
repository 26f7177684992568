"""HyperAttention: near-linear approximate attention from sorted LSH blocks and sampled keys.

Dimension legend: B batch, T query length, S key length, H query heads,
K kv heads (G = H / K query heads share one), D head_dim, n blocks of the
sorted order (bq queries, bk keys each), m sampled keys per block, r LSH bits.

Han et al., 2023, *HyperAttention: Long-context Attention in Near-Linear Time*
(arXiv 2310.05869). A query's softmax is split into two parts, each computed
normalised with its log-sum-exp and merged by log-sum-exp
(`lca.kernels.local.merge`):

  block diagonal  queries and keys are sorted by an LSH code (sortLSH) and cut
                  into n aligned blocks of the sorted order; each query block
                  attends exactly to the key block of the same rank, where the
                  large entries of the attention matrix concentrate.
  residual        the rest of the row, estimated from m keys drawn uniformly
                  (with replacement, as the paper) from the keys outside the
                  query's block: their sum of exp(logits) times R / m, R the
                  number of keys outside the block, is an unbiased estimate of
                  the row's remaining softmax denominator, so the residual's
                  log-sum-exp gets + log(R / m). Pairs of the block diagonal are
                  never drawn, so nothing is counted twice.

Causal attention is the paper's recursion, run level by level so that every
chunk of a level is one batched call: the sequence is cut into 2^L leaves of
at most `min_seq_len` tokens, each attends to itself exactly and causally
(`lca.attention`); at each level above, the second half of every chunk attends
to its first half with the non-causal estimate above, merged in by
log-sum-exp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lca.attention import attention
from lca.kernels.local import merge
from lca.kernels.masks import cdiv, pad_to
from lca.kernels.validation import check_attention_args

LSH_BITS = 7  # the paper's default: 2^7 sign codes, ordered along a Gray code


def _check_positive(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _check_key(key):
    if key is None:
        raise ValueError("key must be a jax.random key (it draws the LSH projections and the"
                         " sampled keys); got None")
    dtype, shape = getattr(key, "dtype", None), tuple(np.shape(key))
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == np.uint32 and shape == (2,)
    if not (typed and shape == () or raw):
        raise ValueError("key must be one jax.random key (jax.random.key(seed), or a uint32 [2]"
                         f" raw key); got dtype {dtype} shape {shape}")


def hyper_attention(q, k, v, *, causal=True, block=256, sample_size=256, key=None,
                    min_seq_len=None, impl="blockwise", scale=None, lsh_bits=LSH_BITS,
                    return_lse=False):
    """HyperAttention (Han et al., 2023): [B, T, H, D] in q's dtype.

    Args:
      q: [B, T, H, D]; k, v: [B, S, K, D], H % K == 0; float32 or bfloat16
        (float64 works). K/V are never repeated: a query head hashes with its
        kv head's projections, so the G heads of a group share the kv head's
        sorted keys, blocks and samples.
      causal: query i sees key j iff j <= i (self-attention: S = T).
      block: keys per block of the sorted order (n = ceil(S / block) blocks;
        queries are cut into the same n blocks by rank, sizes as even as
        possible, so lengths need not be multiples).
      sample_size: m, keys drawn per query block for the residual.
      key: a `jax.random.key`; the same key gives the same result.
      min_seq_len: lengths up to this are computed exactly by `impl`: causal
        leaves, and a whole non-causal call with S <= min_seq_len. Default
        2 * (block + sample_size) causal (below it one split computes no
        fewer logits than exact causal attention: n^2/4 + n (block + m) / 2
        >= n^2 / 2), block + sample_size non-causal (exact then computes no
        more logits per query than the estimate).
      impl: the local kernel of the exact parts (`lca.kernels.registry`).
      scale: logit scale, default D ** -0.5.
      lsh_bits: r random hyperplanes of the sign LSH, 1 .. 16.
      return_lse: also return the log-sum-exp estimate [B, T, H] (float32,
        float64 for float64 inputs).

    `block` and `sample_size` must fit the key length (at most S); the causal
    recursion's shorter calls use min(block, length) and min(sample_size,
    length), the exact limit.

    Exact (to rounding) when each call's residual is covered: block >= S (one
    block, no residual), or sample_size >= S - floor(S / n), the most keys
    outside a block (in particular sample_size >= S), when every key outside
    the block is taken once with weight 1 instead of sampled. Causally the
    calls see at most half the (padded) length, so block >= T or
    sample_size >= T is exact. Otherwise an
    unbiased estimate of each row's softmax denominator; the error shrinks as
    sample_size grows.

    Cost per head: sorting O(T log T), the block diagonal T * block and the
    residual T * m logits (times D); causally that per level of the
    recursion, O(T (block + m) D log(T / min_seq_len)) in all, plus the exact
    leaves T * min_seq_len / 2. Differentiable in q, k, v (autodiff through
    the gathers and both parts; the LSH codes and samples are constants).

    LSH: the paper's sortLSH, not the argmax buckets of `hash_buckets`: the
    signs of r projections give a code, and codes are sorted by their rank in
    the r-bit Gray code, so neighbouring codes in the sorted order differ by
    one hyperplane. Blocks cut across codes, so the order between codes
    matters; argmax bucket ids carry no such order.
    """
    _, t, s = check_attention_args(q, k, v, causal=causal, scale=scale)
    _check_positive("block", block)
    _check_positive("sample_size", sample_size)
    _check_positive("min_seq_len", min_seq_len, allow_none=True)
    _check_positive("lsh_bits", lsh_bits)
    if lsh_bits > 16:
        raise ValueError(f"lsh_bits must be at most 16; got {lsh_bits}")
    _check_key(key)
    if causal and s != t:
        raise ValueError(f"causal hyper attention is self-attention: k length {s} must equal"
                         f" q length {t}")
    for name, value in (("block", block), ("sample_size", sample_size)):
        if value > s:
            raise ValueError(f"{name} {value} does not fit the key length {s}: give at most {s}"
                             f" ({name} = {s} is the exact limit)")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    opts = dict(block=int(block), sample_size=int(sample_size), scale=scale,
                lsh_bits=int(lsh_bits))
    if causal:
        leaf_max = 2 * (block + sample_size) if min_seq_len is None else min_seq_len
        out, lse = _causal(q, k, v, key, min_seq_len=int(leaf_max), impl=impl, **opts)
    elif s <= (block + sample_size if min_seq_len is None else min_seq_len):
        out, lse = attention(q, k, v, impl=impl, scale=scale, return_lse=True)
    else:
        out, lse = _noncausal(q, k, v, key, **opts)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def _acc_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def _causal(q, k, v, key, *, min_seq_len, block, sample_size, impl, scale, lsh_bits):
    """(out, lse) of the causal recursion, in the accumulation dtype."""
    b, t, h, d = q.shape
    levels = 0
    while cdiv(t, 2 ** levels) > min_seq_len:
        levels += 1
    leaf = cdiv(t, 2 ** levels)
    padded = leaf * 2 ** levels
    # Padding goes at the end: a real query never sees a padded key (they are in its
    # future in a leaf, and a chunk's first half holds one only if its second half is
    # all padding), so padding changes nothing real.
    q, k, v = (pad_to(x, padded, 1) for x in (q, k, v))
    chunks = lambda x, n: x.reshape((b * n, padded // n) + x.shape[2:])
    out, lse = attention(chunks(q, 2 ** levels), chunks(k, 2 ** levels),
                         chunks(v, 2 ** levels), impl=impl, causal=True, scale=scale,
                         return_lse=True)
    acc = _acc_dtype(q)
    out, lse = out.astype(acc).reshape(b, padded, h, d), lse.astype(acc).reshape(b, padded, h)
    for level in range(levels):
        n = 2 ** level
        halves = lambda x: x.reshape((b * n, 2, padded // n // 2) + x.shape[2:])
        out_u, lse_u = _noncausal(halves(q)[:, 1], halves(k)[:, 0], halves(v)[:, 0],
                                  jax.random.fold_in(key, level), block=block,
                                  sample_size=sample_size, scale=scale, lsh_bits=lsh_bits)
        o, l = halves(out), halves(lse)
        o_2, l_2 = merge(o[:, 1], l[:, 1], out_u, lse_u)
        out = jnp.stack([o[:, 0], o_2], axis=1).reshape(b, padded, h, d)
        lse = jnp.stack([l[:, 0], l_2], axis=1).reshape(b, padded, h)
    return out[:, :t], lse[:, :t]


def _split(length, parts):
    """Static cut of `length` sorted ranks into `parts` blocks as even as possible.

    Returns (starts [parts + 1], slot_of_rank [length], rank_of_slot [parts * width]
    with `length` for an empty slot, width = the largest block).
    """
    starts = (np.arange(parts + 1) * length) // parts
    width = int(np.diff(starts).max())
    ranks = np.arange(length)
    block_of = np.searchsorted(starts, ranks, side="right") - 1
    slot_of_rank = block_of * width + ranks - starts[block_of]
    rank_of_slot = np.full(parts * width, length)
    rank_of_slot[slot_of_rank] = ranks
    return starts, slot_of_rank, rank_of_slot, width


def _lsh_codes(x, proj_KDr):
    """int32 sort keys [B, K, ..., L] of x [B, K, ..., L, D]: Gray-code rank of the sign code."""
    proj = jnp.einsum("bk...d,kdr->bk...r", x.astype(jnp.float32), proj_KDr)
    bits = proj.shape[-1]
    code = ((proj > 0).astype(jnp.int32) << jnp.arange(bits, dtype=jnp.int32)).sum(-1)
    for shift in (1, 2, 4, 8):  # inverse Gray code: the code's place in the Gray sequence
        code = code ^ (code >> shift)
    return code


def _attend(q_BKGnqD, k_BKncD, v_BKncD, valid_nc, scale, log_weight=0.0):
    """Normalised (out [B, K, G, n, q, D], lse [B, K, G, n, q]) of each block's keys."""
    acc = _acc_dtype(q_BKGnqD)
    s = jnp.einsum("bkgnqd,bkncd->bkgnqc", q_BKGnqD, k_BKncD, preferred_element_type=acc)
    s = s * scale
    if valid_nc is not None:
        s = jnp.where(valid_nc[:, None, :], s, -jnp.inf)
    top = s.max(-1)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.exp(s - top[..., None])
    total = p.sum(-1)
    out = jnp.einsum("bkgnqc,bkncd->bkgnqd", p, v_BKncD.astype(acc))
    out = out / jnp.where(total > 0, total, 1.0)[..., None]
    return out, jnp.log(total) + top + log_weight


def _noncausal(q, k, v, key, *, block, sample_size, scale, lsh_bits):
    """(out, lse) of the non-causal estimate, in the accumulation dtype (batched einsums)."""
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    n = cdiv(s, min(block, s))
    q_starts, q_slot_of_rank, q_rank_of_slot, bq = _split(t, n)
    k_starts, _, k_rank_of_slot, bk = _split(s, n)
    proj_key, sample_key = jax.random.split(key)
    proj = jax.random.normal(proj_key, (kh, d, lsh_bits), jnp.float32)

    q_BKGTD = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4)
    k_BKSD, v_BKSD = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    q_order = jnp.argsort(_lsh_codes(q_BKGTD, proj), axis=-1, stable=True)  # [B, K, G, T]
    k_order = jnp.argsort(_lsh_codes(k_BKSD, proj), axis=-1, stable=True)  # [B, K, S]

    q_blocks = _gather(q_BKGTD, q_order, q_rank_of_slot.reshape(n, bq))    # [B, K, G, n, bq, D]
    k_ranks = k_rank_of_slot.reshape(n, bk)
    k_valid = jnp.asarray(k_ranks < s) if n * bk > s else None
    out, lse = _attend(q_blocks, _gather(k_BKSD, k_order, k_ranks),
                       _gather(v_BKSD, k_order, k_ranks), k_valid, scale)
    if n > 1:  # the residual: keys outside each block
        sizes = np.diff(k_starts)
        outside = s - sizes                                               # [n], all >= 1
        if sample_size >= outside.max():  # covered: every outside key once, weight 1
            picks = jnp.arange(outside.max())[None, :]                   # [1, c]
            valid, log_weight = picks < jnp.asarray(outside)[:, None], 0.0
        else:  # m of block i's R_i outside keys, uniformly with replacement, weight R_i / m
            picks = jax.random.randint(sample_key, (b, kh, n, sample_size), 0,
                                       outside[:, None])
            valid = None
            log_weight = jnp.log(jnp.asarray(outside / sample_size, out.dtype))[:, None]
        # The i-th outside key of block i: ranks below its start, then past its end.
        ranks = picks + jnp.asarray(sizes)[:, None] * (picks >= k_starts[:-1, None])
        out_r, lse_r = _attend(q_blocks, _gather(k_BKSD, k_order, ranks),
                               _gather(v_BKSD, k_order, ranks), valid, scale, log_weight)
        out, lse = merge(out, lse, out_r, lse_r)
    # Back to natural order: token -> its sorted rank -> its slot.
    slot = jnp.asarray(q_slot_of_rank)[jnp.argsort(q_order, axis=-1)]   # [B, K, G, T]
    out = jnp.take_along_axis(out.reshape(b, kh, g, n * bq, d), slot[..., None], axis=-2)
    lse = jnp.take_along_axis(lse.reshape(b, kh, g, n * bq), slot, axis=-1)
    return (out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d),
            lse.transpose(0, 3, 1, 2).reshape(b, t, h))


def _gather(x, order, ranks):
    """x [..., L, D] at sorted ranks [n, c] (static) or [..., n, c] (drawn): [..., n, c, D].

    order [..., L] lists token indices by rank; ranks >= L (empty slots) are clipped
    to the last one, and their results are masked or dropped by the caller.
    """
    lead, length = order.shape[:-1], order.shape[-1]
    ranks = jnp.broadcast_to(jnp.minimum(ranks, length - 1), lead + ranks.shape[-2:])
    idx = jnp.take_along_axis(order, ranks.reshape(lead + (-1,)), axis=-1)
    return jnp.take_along_axis(x, idx[..., None], axis=-2).reshape(ranks.shape + x.shape[-1:])
