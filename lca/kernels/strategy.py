"""What every strategy does with its arguments before it distributes anything.

A strategy (ring, all-gather, ...) runs inside `jax.shard_map` on one
device's shard of a sequence sharded on `axis_name`, in layout order, and
computes with a local kernel it is handed (`lca.kernels.local`). `prepare`
validates the shard's arguments, resolves and checks the local kernel, and
builds its config and the shard's mask arrays, the same way for all of them.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lca.kernels import local as local_lib
from lca.kernels import masks as masks_lib
from lca.kernels.masks import MaskArrays, MaskSpec
from lca.kernels.validation import check_attention_args


def shard_mask_arrays(q, k, axis_name, *, positions=None, kv_positions=None, segment_ids=None,
                      kv_segment_ids=None) -> MaskArrays:
    """This shard's MaskArrays; positions default to the contiguous layout.

    Without positions, queries sit at axis_index * T + arange(T) and keys at
    axis_index * S + arange(S); with positions, kv_positions default to them
    (self-attention over the same tokens).
    """
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]

    def contiguous(length):
        return lax.axis_index(axis_name) * length + jnp.arange(length, dtype=jnp.int32)

    if kv_positions is None:
        if positions is None:
            kv_positions = contiguous(kv_len)
        elif kv_len == q_len:
            kv_positions = positions
        else:
            raise ValueError(
                f"kv_positions is needed when positions are given and the local key length"
                f" ({kv_len}) differs from the query length ({q_len})")
    if positions is None:
        positions = contiguous(q_len)
    return masks_lib.make_mask_arrays(
        batch, q_len, kv_len, positions=positions, kv_positions=kv_positions,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)


def prepare(name, q, k, v, *, axis_name, local, causal, window, segment_ids, kv_segment_ids,
            positions, kv_positions, scale, block_q, block_k, q_len=None, kv_len=None,
            placement=None):
    """(local kernel, its LocalConfig, this shard's MaskArrays) for strategy `name`.

    Raises a ValueError before tracing for bad arguments or a local kernel that
    does not support the call. q_len, kv_len: the query and key lengths the
    local kernel sees (the shard's, or all shards' after a gather). placement:
    the `local.Placement` of those tokens, where the caller knows its layout.
    """
    check_attention_args(
        q, k, v, causal=causal, window=window, segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids, positions=positions, kv_positions=kv_positions,
        scale=scale)
    spec = MaskSpec(bool(causal), window, segment_ids is not None)
    kernel = local_lib.resolve(local, q, k, spec, strategy=name)
    cfg = local_lib.config(kernel, q, k, causal=causal, window=window,
                           segments=segment_ids is not None, scale=scale, block_q=block_q,
                           block_k=block_k, q_len=q_len, kv_len=kv_len, sharded=True,
                           placement=placement)
    arrays = shard_mask_arrays(q, k, axis_name, positions=positions, kv_positions=kv_positions,
                               segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
    return kernel, cfg, arrays
