"""Ring attention: exact softmax attention over a sequence sharded on a mesh axis.

Dimension legend (all per shard):
  B batch, T local query length, S local key/value length, H query heads,
  K kv heads (H % K == 0), D head_dim, n ring size (devices on `axis_name`).

`ring_attention` runs inside `jax.shard_map` with any local kernel
(`lca.kernels.local`). Each device keeps its queries; the K/V shards walk
the ring. At step s device r holds the K/V shard of device r - s (mod n) and

  * issues the `ppermute` that brings the next shard before computing, so the
    transfer can overlap the step's work; n - 1 hops in all, none wasted;
  * classifies the (local queries, visiting keys) shard pair from position
    and segment extremes (`masks.classify_blocks`, one block per shard): a
    fully masked pair costs no FLOPs; any other runs the local kernel's
    forward (a tiled kernel classifies its own tiles the same way, so every
    tile of a fully visible pair takes the unmasked path);
  * merges the step's output and float32 log-sum-exp into the running ones.

K and V travel as one [2, B, S, K, D] buffer in the input dtype, with only
the K kv heads; the positions and segment ids of those tokens travel with
them, so masks follow the tokens whatever the layout.

The backward pass is a `jax.custom_vjp` that saves only the inputs, the
output and the float32 log-sum-exp. The backward ring runs the local
kernel's backward at each step, given the row's global log-sum-exp, so each
step's gradients are exact parts of the total. dK/dV accumulate in float32
in a buffer that travels with its K/V shard and goes home at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lca.kernels import local as local_lib
from lca.kernels import masks as masks_lib
from lca.kernels import strategy, vma
from lca.kernels.masks import MaskArrays, MaskSpec

F32 = jnp.float32


def _shift(tree, axis_name, n, hops=1):
    """Sends every leaf from device i to device i + hops (mod n) of the ring."""
    if hops % n == 0:
        return tree
    perm = [(i, (i + hops) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def _shard_stats(pos_BL, seg_BL):
    """Extremes of a whole shard, as one block: masks.BlockStats with n = 1."""
    length = pos_BL.shape[1]
    return masks_lib.block_stats(pos_BL, seg_BL, length, length)


def shard_pair_kind(spec: MaskSpec, q_pos, kv_pos, q_seg=None, kv_seg=None):
    """SKIP, MASKED or FULL (masks.py's int32 codes) for a whole (query, key) shard pair.

    Positions and segment ids are [B, T] / [B, S]; a shard is one block of
    `masks.classify_blocks`, so SKIP and FULL are exact claims about every pair.
    """
    return masks_lib.classify_blocks(spec, _shard_stats(q_pos, q_seg),
                                     _shard_stats(kv_pos, kv_seg))[0, 0]


def _unless_masked(cfg, arrays, skip, compute):
    """`compute()` unless the shard pair is fully masked, then `skip()` (no FLOPs).

    A tiled local kernel classifies its own tiles the same way, so in a fully
    visible pair every tile is FULL and takes the unmasked path; a second,
    unmasked copy of the step need not be compiled.
    """
    if cfg.spec == MaskSpec():
        return compute()
    kind = shard_pair_kind(cfg.spec, *arrays)
    return lax.cond(kind == masks_lib.SKIP, skip, compute)


def step_forward(kernel, cfg, q, kv, arrays: MaskArrays, out, lse):
    """One forward ring step: the local queries attend to the visiting K/V shard.

    Args:
      kernel, cfg: the `local.LocalKernel` and its `local.LocalConfig`.
      q: [B, T, H, D]; kv: [2, B, S, K, D] (K and V stacked).
      arrays: MaskArrays of the local queries and the visiting keys.
      out, lse: float32 [B, T, H, D] / [B, T, H], the result so far.

    Returns:
      (out, lse) merged with this step's; unchanged, at no cost, when the
      shard pair is fully masked.
    """
    def attend():
        out_t, lse_t = kernel.forward(cfg, q, kv[0], kv[1], arrays)
        return local_lib.merge(out, lse, out_t.astype(out.dtype), lse_t.astype(lse.dtype))

    return _unless_masked(cfg, arrays, lambda: (out, lse), attend)


def step_backward(kernel, cfg, q, kv, arrays: MaskArrays, lse, do, delta, dq, dkv):
    """One backward ring step: gradient parts from the visiting K/V shard.

    lse and delta ([B, T, H] float32) are the rows' global log-sum-exp and
    rowsum(do * out) - dlse, so the parts are exact. Returns (dq, dkv) with
    this step's float32 parts added to dq [B, T, H, D] and dkv [2, B, S, K, D].
    """
    def grads():
        dq_t, dk_t, dv_t = kernel.backward(cfg, q, kv[0], kv[1], arrays, lse, do, delta)
        return dq + dq_t.astype(dq.dtype), dkv + jnp.stack([dk_t, dv_t]).astype(dkv.dtype)

    return _unless_masked(cfg, arrays, lambda: (dq, dkv), grads)


def _ring_forward(kernel, cfg, axis_name, steps, q, k, v, arrays):
    n = lax.axis_size(axis_name)
    b, t, h, d = q.shape

    def compute(acc, travel):
        kv, kv_pos, kv_seg = travel
        return step_forward(kernel, cfg, q, kv, arrays._replace(kv_pos=kv_pos, kv_seg=kv_seg),
                            *acc)

    def ring_step(carry, _):
        acc, travel = carry
        arriving = _shift(travel, axis_name, n)  # issued before this step's compute
        return (compute(acc, travel), arriving), None

    dtype = jnp.promote_types(q.dtype, F32)  # float64 for a float64-capable kernel
    acc = vma.like((jnp.zeros((b, t, h, d), dtype), jnp.full((b, t, h), -jnp.inf, dtype)),
                   q, k, v, arrays)
    travel = (jnp.stack([k, v]), arrays.kv_pos, arrays.kv_seg)
    (acc, travel), _ = lax.scan(ring_step, (acc, travel), None, length=steps - 1)
    return compute(acc, travel)


def _ring_backward(kernel, cfg, axis_name, steps, q, k, v, arrays, out, lse, do, dlse):
    n = lax.axis_size(axis_name)
    delta = local_lib.row_delta(do, out, dlse)

    def compute(dq, travel, dkv):
        kv, kv_pos, kv_seg = travel
        return step_backward(kernel, cfg, q, kv, arrays._replace(kv_pos=kv_pos, kv_seg=kv_seg),
                             lse, do, delta, dq, dkv)

    def ring_step(carry, _):
        dq, travel, dkv = carry
        arriving = _shift(travel, axis_name, n)
        dq, dkv = compute(dq, travel, dkv)
        return (dq, arriving, _shift(dkv, axis_name, n)), None  # dK/dV follow their block

    travel = (jnp.stack([k, v]), arrays.kv_pos, arrays.kv_seg)
    dtype = jnp.promote_types(q.dtype, F32)
    zeros = vma.like((jnp.zeros(q.shape, dtype), jnp.zeros((2,) + k.shape, dtype)),
                     q, k, v, arrays, do)
    carry = (zeros[0], travel, zeros[1])
    (dq, travel, dkv), _ = lax.scan(ring_step, carry, None, length=steps - 1)
    dq, dkv = compute(dq, travel, dkv)
    # The block here belongs to device r - (steps - 1): one hop takes its grads home.
    dkv = _shift(dkv, axis_name, n, hops=-(steps - 1))
    return dq, dkv[0], dkv[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ring(kernel, cfg, axis_name, steps, q, k, v, arrays):
    out, lse = _ring_forward(kernel, cfg, axis_name, steps, q, k, v, arrays)
    return out.astype(q.dtype), lse


def _ring_fwd(kernel, cfg, axis_name, steps, q, k, v, arrays):
    out, lse = _ring(kernel, cfg, axis_name, steps, q, k, v, arrays)
    return (out, lse), (q, k, v, arrays, out, lse)


def _ring_bwd(kernel, cfg, axis_name, steps, residuals, cotangents):
    q, k, v, arrays, out, lse = residuals
    do, dlse = cotangents
    dq, dk, dv = _ring_backward(kernel, cfg, axis_name, steps, q, k, v, arrays, out, lse, do,
                                dlse)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


def window_steps(window, shard_len, num_shards):
    """Ring steps a causal window needs on the contiguous layout: 1 + ceil((w - 1) / L), at most n.

    A query at the start of shard r sees back to w - 1 tokens before it; the
    shard s hops upstream ends (s - 1) L + 1 tokens before that query.
    """
    return min(num_shards, 1 + -(-(window - 1) // shard_len))


def layout_options(layout, causal, window, shard_len, num_shards, stripe=1):
    """Options `attention_in_layout` passes for a layout: fewer steps for a contiguous window."""
    if layout == "contiguous" and causal and window is not None:
        return {"max_steps": window_steps(window, shard_len, num_shards)}
    return {}


def ring_attention(q, k, v, *, axis_name, local=None, causal=False, window=None,
                   segment_ids=None, kv_segment_ids=None, positions=None, kv_positions=None,
                   scale=None, block_q=None, block_k=None, max_steps=None, placement=None,
                   return_lse=False):
    """Exact softmax attention of this shard's queries over the whole ring's keys.

    Call inside `jax.shard_map` with the sequence dimension sharded on
    `axis_name`; every argument is this device's shard, in layout order.

    Args:
      q: [B, T, H, D] float32 or bfloat16.
      k, v: [B, S, K, D], H % K == 0 (grouped-query heads are never repeated).
      axis_name: the mesh axis the sequence is sharded on (the ring).
      local: the local kernel each step runs: a registry name
        (`lca.kernels.registry`), a `local.LocalKernel`, or None for the default.
      causal, window: as in `lca.attention`, on global positions.
      segment_ids, kv_segment_ids: int [B, T] / [B, S] local shards; attend
        only within equal ids; kv_segment_ids defaults to segment_ids.
      positions, kv_positions: int [T] or [B, T] / [S] or [B, S] global
        positions of the local tokens. Default: the contiguous layout,
        axis_index * T + arange(T); kv_positions defaults to positions.
      scale: logit scale, default D ** -0.5.
      block_q, block_k: tile lengths of each step's local kernel (default: the
        kernel's, `local.default_tiles`). For zigzag, a divisor of T / 2 keeps
        tiles inside one chunk.
      max_steps: ring steps to take (default n, the whole ring). Fewer skips
        the shards more than max_steps - 1 hops upstream; only correct when
        every such pair is masked, as for a causal window w with
        max_steps >= `window_steps(w, S, n)` on the contiguous layout
        (`layout_options` sets it there).
      placement: the `local.Placement` of the layout ("shards" view), for a local
        kernel with static masks (splash); `attention_in_layout` passes it.
      return_lse: also return the float32 log-sum-exp [B, T, H].

    Returns:
      [B, T, H, D] in q's dtype (zeros for a query that sees no key), and with
      `return_lse` the log-sum-exp (-inf for such a query).
    """
    kernel, cfg, arrays = strategy.prepare(
        "ring", q, k, v, axis_name=axis_name, local=local, causal=causal, window=window,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, positions=positions,
        kv_positions=kv_positions, scale=scale, block_q=block_q, block_k=block_k,
        placement=placement)
    n = lax.axis_size(axis_name)
    if max_steps is not None and (isinstance(max_steps, bool)
                                  or not isinstance(max_steps, (int, np.integer))
                                  or max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer or None; got {max_steps!r}")
    steps = n if max_steps is None else min(int(max_steps), n)
    out, lse = _ring(kernel, cfg, axis_name, steps, q, k, v, arrays)
    return (out, lse) if return_lse else out
