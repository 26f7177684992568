"""All-gather attention: the baseline for a sequence sharded on a mesh axis.

Dimension legend (per shard): B batch, T local query length, S local
key/value length, H query heads, K kv heads, D head_dim, n devices on
`axis_name`.

Each device all-gathers K and V (one [2, B, S, K, D] buffer, kv heads only)
with their positions and segment ids, then runs a local kernel
(`lca.kernels.local`) of its T local queries against all n S keys. This is
what MaxText does by default: one collective, but n times the K/V memory of
the ring. The backward pass recomputes the gather and sends each device's
float32 dK/dV parts home with one reduce-scatter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lca.kernels import local as local_lib
from lca.kernels import strategy


def _gather(axis_name, k, v, arrays):
    kv = lax.all_gather(jnp.stack([k, v]), axis_name, axis=2, tiled=True)
    gather = lambda x: None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)
    return kv, arrays._replace(kv_pos=gather(arrays.kv_pos), kv_seg=gather(arrays.kv_seg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _allgather(kernel, cfg, axis_name, q, k, v, arrays):
    kv, full = _gather(axis_name, k, v, arrays)
    out, lse = kernel.forward(cfg, q, kv[0], kv[1], full)
    return out.astype(q.dtype), lse


def _allgather_fwd(kernel, cfg, axis_name, q, k, v, arrays):
    out, lse = _allgather(kernel, cfg, axis_name, q, k, v, arrays)
    return (out, lse), (q, k, v, arrays, out, lse)


def _allgather_bwd(kernel, cfg, axis_name, residuals, cotangents):
    q, k, v, arrays, out, lse = residuals
    do, dlse = cotangents
    kv, full = _gather(axis_name, k, v, arrays)
    dq, dk, dv = kernel.backward(cfg, q, kv[0], kv[1], full, lse, do,
                                 local_lib.row_delta(do, out, dlse))
    dkv = lax.psum_scatter(jnp.stack([dk, dv]), axis_name, scatter_dimension=2, tiled=True)
    return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None


_allgather.defvjp(_allgather_fwd, _allgather_bwd)


def allgather_attention(q, k, v, *, axis_name, local=None, causal=False, window=None,
                        segment_ids=None, kv_segment_ids=None, positions=None,
                        kv_positions=None, scale=None, block_q=None, block_k=None,
                        placement=None, return_lse=False):
    """Exact softmax attention of this shard's queries over all shards' keys.

    Same contract as `lca.kernels.ring_attention` (call inside `jax.shard_map`
    with the sequence sharded on `axis_name`; global positions of the local
    tokens; default the contiguous layout; any local kernel; placement: the
    layout's "gathered" view), computed by one all-gather of K/V. Key tiles walk
    the gathered n * S keys.
    """
    n = lax.axis_size(axis_name)
    kernel, cfg, arrays = strategy.prepare(
        "allgather", q, k, v, axis_name=axis_name, local=local, causal=causal, window=window,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, positions=positions,
        kv_positions=kv_positions, scale=scale, block_q=block_q, block_k=block_k,
        kv_len=n * k.shape[1], placement=placement)
    out, lse = _allgather(kernel, cfg, axis_name, q, k, v, arrays)
    return (out, lse) if return_lse else out
