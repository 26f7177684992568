"""All-gather attention: the baseline for a sequence sharded on a mesh axis.

Dimension legend (per shard): B batch, T local query length, S local
key/value length, H query heads, K kv heads, D head_dim, n devices on
`axis_name`.

Each device all-gathers K and V (one [2, B, S, K, D] buffer, kv heads only)
with their positions and segment ids, then runs blockwise attention of its
T local queries against all n S keys. This is what MaxText does by default:
one collective, but n times the K/V memory of the ring. The backward pass
recomputes the gather and sends each device's float32 dK/dV parts home with
one reduce-scatter.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from lca.kernels import blockwise
from lca.kernels.ring import shard_mask_arrays
from lca.kernels.validation import check_attention_args

F32 = jnp.float32


def _gather(axis_name, k, v, arrays):
    kv = lax.all_gather(jnp.stack([k, v]), axis_name, axis=2, tiled=True)
    gather = lambda x: None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)
    return kv, arrays._replace(kv_pos=gather(arrays.kv_pos), kv_seg=gather(arrays.kv_seg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _allgather(cfg, axis_name, q, k, v, arrays):
    kv, full = _gather(axis_name, k, v, arrays)
    out, lse = blockwise.forward(cfg, q, kv[0], kv[1], full)
    return out.astype(q.dtype), lse


def _allgather_fwd(cfg, axis_name, q, k, v, arrays):
    out, lse = _allgather(cfg, axis_name, q, k, v, arrays)
    return (out, lse), (q, k, v, arrays, out, lse)


def _allgather_bwd(cfg, axis_name, residuals, cotangents):
    q, k, v, arrays, out, lse = residuals
    do, dlse = cotangents
    kv, full = _gather(axis_name, k, v, arrays)
    delta = (do.astype(F32) * out.astype(F32)).sum(-1) - dlse
    dq, dk, dv = blockwise.backward(cfg, q, kv[0], kv[1], full, lse, do, delta)
    dkv = lax.psum_scatter(jnp.stack([dk, dv]), axis_name, scatter_dimension=2, tiled=True)
    return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None


_allgather.defvjp(_allgather_fwd, _allgather_bwd)


def allgather_attention(q, k, v, *, axis_name, causal=False, window=None, segment_ids=None,
                        kv_segment_ids=None, positions=None, kv_positions=None, scale=None,
                        block_q=512, block_k=512, return_lse=False):
    """Exact softmax attention of this shard's queries over all shards' keys.

    Same contract as `lca.kernels.ring_attention` (call inside `jax.shard_map`
    with the sequence sharded on `axis_name`; global positions of the local
    tokens; default the contiguous layout), computed by one all-gather of K/V.
    """
    check_attention_args(
        q, k, v, causal=causal, window=window, segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids, positions=positions, kv_positions=kv_positions,
        scale=scale)
    cfg = blockwise.make_config(q, k, causal=causal, window=window,
                                segments=segment_ids is not None, scale=scale,
                                block_q=block_q, block_k=block_k)
    # Key tiles walk the gathered n * S keys, not the local S.
    cfg = dataclasses.replace(cfg, block_k=min(int(block_k), lax.axis_size(axis_name) * k.shape[1]))
    arrays = shard_mask_arrays(q, k, axis_name, positions=positions, kv_positions=kv_positions,
                               segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
    out, lse = _allgather(cfg, axis_name, q, k, v, arrays)
    return (out, lse) if return_lse else out
