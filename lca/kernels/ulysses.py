"""All-to-all (Ulysses) sequence parallelism, and Ulysses x ring (USP), over any local kernel.

Dimension legend (per shard): B batch, T local length (n T global on the
axis), H query heads, K kv heads (H % K == 0), D head_dim, n devices on the
all-to-all axis, H / n query heads per device after the all-to-all.

`ulysses_attention` runs inside `jax.shard_map` with the sequence sharded on
`axis_name`. One all-to-all turns each device's T tokens of all H heads into
all n T tokens of H / n heads (q, k, v); the positions and segment ids of
every token are all-gathered once; the local kernel attends over the whole
sequence on those heads; one all-to-all turns the output back. Every layout
is exact because positions travel with their tokens; where the gathered
order would interleave positions (striped), the gathered sequence is put in
natural order before the local kernel and back after it, so a tiled kernel
still skips the causally masked half.

Grouped-query heads: with K % n == 0 each device receives the K / n kv heads
its H / n query heads read; with n % K == 0 (fewer kv heads than devices)
each kv head is copied, before the all-to-all, once for each of the n / K
devices whose query heads read it, so a device receives exactly its one kv
head: n / K copies of each head cross the axis, never all heads everywhere.
Any other K is refused.

Gradients: the all-to-alls and gathers are linear and JAX differentiates
them (an all-to-all's transpose is the reverse all-to-all; a copy's is a
sum); the local kernel runs under `local.attend`, which saves only its
inputs, output and log-sum-exp.

`usp_attention` shards the sequence over two axes, (all-to-all axis, ring
axis): the all-to-all above over the first makes each device hold its ring
shard's whole sequence for H / n_a2a heads, and `ring.ring_attention` over
the second runs the local kernel step by step, so the layout's balance over
the ring is kept.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from lca import layouts
from lca.kernels import local as local_lib
from lca.kernels import ring, strategy


def check_shapes(q_shape, k_shape, axes):
    """Strategy.check: the heads split over the all-to-all axis, the first of `axes`
    ((name, size) pairs)."""
    name, size = axes[0]
    check_heads(q_shape[2], k_shape[2], size, f"axis {name!r}")


def local_heads(q_shape, k_shape, axes):
    """Strategy.local_heads: (H / n, max(K / n, 1)) after the all-to-all over `axes[0]`."""
    n = axes[0][1]
    return q_shape[2] // n, max(k_shape[2] // n, 1)


def check_heads(heads, kv_heads, n, axis="the all-to-all axis"):
    """Raises a ValueError unless heads split over n devices and kv heads split or copy."""
    if heads % n:
        degrees = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(f"heads ({heads}) must divide by the {n} devices of {axis}; degrees"
                         f" that would work: {degrees}")
    if kv_heads % n and n % kv_heads:
        raise ValueError(f"kv_heads ({kv_heads}) must divide by, or divide, the {n} devices of"
                         f" {axis}; kv_heads that would work: "
                         f"{[k for k in range(1, heads + 1) if heads % k == 0 and (k % n == 0 or n % k == 0)]}")


def gather_tokens(x, axis_name):
    """[B, T, h, ...] sequence shard of all h heads -> [B, n T, h / n, ...]: every token of
    this device's heads (one all-to-all over `axis_name`)."""
    return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def scatter_tokens(x, axis_name):
    """The inverse of `gather_tokens`: [B, n T, h / n, ...] -> [B, T, h, ...]."""
    return lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)


def gather_kv_tokens(x, axis_name):
    """K or V [B, T, K, D] -> [B, n T, max(K / n, 1), D]: the kv heads this device's query
    heads read; with K < n each head is first copied for the n / K devices that read it."""
    n, kv_heads = lax.axis_size(axis_name), x.shape[2]
    if kv_heads < n:
        x = jnp.repeat(x, n // kv_heads, axis=2)
    return gather_tokens(x, axis_name)


def _gather(x, axis_name):
    return None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)


def to_heads(q, k, v, arrays, axis_name):
    """(q, k, v, mask arrays) of all n T tokens for this device's heads."""
    arrays = arrays._replace(q_pos=_gather(arrays.q_pos, axis_name),
                             kv_pos=_gather(arrays.kv_pos, axis_name),
                             q_seg=_gather(arrays.q_seg, axis_name),
                             kv_seg=_gather(arrays.kv_seg, axis_name))
    return (gather_tokens(q, axis_name), gather_kv_tokens(k, axis_name),
            gather_kv_tokens(v, axis_name), arrays)


def _natural_order(reorder, length, n):
    """(permutation to natural order, its inverse) of a gathered layout, or None."""
    if reorder is None:
        return None
    layout, stripe = reorder
    order = layouts.unpermute(np.arange(length), layout, n, axis=0, stripe=stripe)
    return order, np.argsort(order)


def _take(x, index):
    return None if x is None else jnp.take(x, index, axis=1)


def ulysses_attention(q, k, v, *, axis_name, local=None, causal=False, window=None,
                      segment_ids=None, kv_segment_ids=None, positions=None, kv_positions=None,
                      scale=None, block_q=None, block_k=None, reorder=None, placement=None,
                      return_lse=False):
    """Exact softmax attention of this shard's queries over all shards' keys, by all-to-all.

    Same contract as `lca.kernels.ring_attention` (inside `jax.shard_map`, the
    sequence sharded on `axis_name`, global positions of the local tokens,
    any local kernel); H % n == 0 and K % n == 0 or n % K == 0.

    reorder: (layout, stripe) of a layout whose gathered order interleaves
      positions (`layout_options` passes it for striped): the gathered
      sequence is put in natural order for the local kernel.
    placement: the layout's "whole" view (natural order after `reorder`).
    """
    n = lax.axis_size(axis_name)
    check_heads(q.shape[2], k.shape[2], n, f"axis {axis_name!r}")
    kernel, cfg, arrays = strategy.prepare(
        "ulysses", q, k, v, axis_name=axis_name, local=local, causal=causal, window=window,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, positions=positions,
        kv_positions=kv_positions, scale=scale, block_q=block_q, block_k=block_k,
        q_len=n * q.shape[1], kv_len=n * k.shape[1],
        placement=placement if reorder is None or placement is None else
        dataclasses.replace(placement, layout="contiguous", num_shards=1))
    q, k, v, arrays = to_heads(q, k, v, arrays, axis_name)
    order = _natural_order(reorder, q.shape[1], n)
    if order is not None:
        q, k, v = (_take(x, order[0]) for x in (q, k, v))
        arrays = type(arrays)(*(_take(x, order[0]) for x in arrays))
    out, lse = local_lib.attend(kernel, cfg, q, k, v, arrays)
    if order is not None:
        out, lse = _take(out, order[1]), _take(lse, order[1])
    out = scatter_tokens(out, axis_name)
    return (out, scatter_tokens(lse, axis_name)) if return_lse else out


def layout_options(layout, causal, window, shard_len, num_shards, stripe=1):
    """Options `attention_in_layout` passes: natural order for striped's gathered sequence."""
    return {"reorder": (layout, stripe)} if layout == "striped" else {}


def usp_attention(q, k, v, *, axis_name, local=None, causal=False, window=None,
                  segment_ids=None, kv_segment_ids=None, positions=None, kv_positions=None,
                  scale=None, block_q=None, block_k=None, max_steps=None, placement=None,
                  return_lse=False):
    """Ulysses x ring: all-to-all over `axis_name[0]`, the ring over `axis_name[1]`.

    Inside `jax.shard_map` with the sequence sharded over both axes, the ring
    axis major: device (ring r, all-to-all a) holds the a-th of n_a2a pieces of
    ring shard r. Same contract otherwise as `ring_attention`; H % n_a2a == 0
    and K % n_a2a == 0 or n_a2a % K == 0. max_steps: of the ring
    (`ring.layout_options` sets it for a contiguous causal window).
    """
    a2a, ring_axis = axis_name
    n = lax.axis_size(a2a)
    check_heads(q.shape[2], k.shape[2], n, f"axis {a2a!r}")
    arrays = strategy.shard_mask_arrays(q, k, (ring_axis, a2a), positions=positions,
                                        kv_positions=kv_positions, segment_ids=segment_ids,
                                        kv_segment_ids=kv_segment_ids)
    q, k, v, arrays = to_heads(q, k, v, arrays, a2a)
    out = ring.ring_attention(
        q, k, v, axis_name=ring_axis, local=local, causal=causal, window=window,
        segment_ids=arrays.q_seg, kv_segment_ids=arrays.kv_seg, positions=arrays.q_pos,
        kv_positions=arrays.kv_pos, scale=scale, block_q=block_q, block_k=block_k,
        max_steps=max_steps, placement=placement, return_lse=return_lse)
    if return_lse:
        return scatter_tokens(out[0], a2a), scatter_tokens(out[1], a2a)
    return scatter_tokens(out, a2a)
