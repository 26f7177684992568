"""Sequence-parallel attention: global arrays in, `jax.shard_map` over a mesh axis inside.

Dimension legend: B batch, T sequence length (global), H query heads,
K kv heads, D head_dim, n devices on the sequence axis.

Two entry points:

  attention_in_layout          arrays already in layout order (a model permutes
                               once at its input); returns layout order.
  sequence_parallel_attention  natural order in and out: permute, attend,
                               unpermute.

The sequence dimension is sharded on `axis`; batch on whichever of the mesh's
`data` and `fsdp` axes exist (and are not `axis`), heads on `tensor` if it
exists. Every argument is checked on shapes before anything compiles.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lca import layouts
from lca.kernels.allgather import allgather_attention
from lca.kernels.ring import ring_attention
from lca.kernels.validation import check_attention_args, check_block

IMPLS = ("ring", "allgather", "linear")
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
_SOFTMAX_OPTIONS = ("block_q", "block_k", "stripe")
_DEFAULT_BLOCK = 512


def _check_names(mesh, axis, impl, layout):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}; got {impl!r}")
    layouts.check_layout_name(layout)
    if axis not in mesh.axis_names:
        raise ValueError(
            f"axis={axis!r} is not an axis of the mesh; its axes are {list(mesh.axis_names)}")


def _nearest_multiples(value, m):
    lower, upper = (value // m) * m, (value // m + 1) * m
    return [x for x in (lower, upper) if x > 0]


def _mesh_axes(mesh, axis):
    """(batch axes, head axis or None) of the mesh, given the sequence axis."""
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names and a != axis)
    head = HEAD_AXIS if HEAD_AXIS in mesh.axis_names and HEAD_AXIS != axis else None
    return batch, head


def _check_divisible(what, value, axes, mesh):
    size = math.prod(mesh.shape[a] for a in axes)
    if value % size:
        raise ValueError(
            f"{what} {value} does not divide by the mesh axes {list(axes)} of size {size};"
            f" nearest valid {what}: {_nearest_multiples(value, size)}")


def _check_softmax(q, k, v, mesh, axis, layout, causal, window, positions, segment_ids, scale,
                   options):
    unknown = sorted(set(options) - set(_SOFTMAX_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for softmax sequence-parallel attention;"
            f" valid options: {list(_SOFTMAX_OPTIONS)}")
    batch, seq_len, kv_len = check_attention_args(
        q, k, v, causal=causal, window=window, segment_ids=segment_ids, positions=positions,
        scale=scale)
    if kv_len != seq_len:
        raise ValueError(
            f"sequence-parallel attention attends a sequence to itself: k/v length {kv_len}"
            f" must equal q length {seq_len}")
    for name in ("block_q", "block_k"):
        if name in options:
            check_block(name, options[name])
    layouts.check_layout(seq_len, layout, mesh.shape[axis], options.get("stripe", 1))
    batch_axes, head_axis = _mesh_axes(mesh, axis)
    _check_divisible("batch", batch, batch_axes, mesh)
    if head_axis:
        _check_divisible("heads", q.shape[2], (head_axis,), mesh)
        _check_divisible("kv_heads", k.shape[2], (head_axis,), mesh)


def default_block(layout, seq_len, num_shards, groups=1):
    """Tile length for a layout's ring steps when block_q / block_k are not given.

    512 with one query head per kv head; 256 with grouped-query heads, whose
    tiles hold `groups` query heads of rows each (G * bq rows share one K/V
    tile), so halving the tile keeps its float32 working set as small as
    without groups. At most a chunk for zigzag, so no tile straddles its two
    chunks. Measured on the 2-core CPU (one ring step, forward+backward,
    shard of 2048, 8 heads / 2 kv heads, three runs): a striped step took
    0.54-0.84x and a fully visible step 0.69-0.97x its time at 512; with 4 / 4
    heads, 256 was 1.15-1.4x slower on a fully visible step.
    """
    block = _DEFAULT_BLOCK if groups == 1 else _DEFAULT_BLOCK // 2
    if layout == "zigzag":
        return min(block, seq_len // (2 * num_shards))
    return block


def window_steps(window, shard_len, num_shards):
    """Ring steps a causal window needs on the contiguous layout: 1 + ceil((w - 1) / L), at most n.

    A query at the start of shard r sees back to w - 1 tokens before it; the
    shard s hops upstream ends (s - 1) L + 1 tokens before that query.
    """
    return min(num_shards, 1 + -(-(window - 1) // shard_len))


def _delegate_linear(q, k, v, mesh, axis, layout, positions, causal, window, segment_ids, scale,
                     options):
    from lca.parallel import linear  # written by the linear-attention work; lazy on purpose

    # Linear attention is causal by construction; softmax-only options pass on
    # only when set, so the linear entry point can reject what it lacks.
    extra = {name: value for name, value in
             (("window", window), ("segment_ids", segment_ids), ("scale", scale))
             if value is not None}
    return linear.attention_in_layout_linear(q, k, v, mesh=mesh, axis=axis, layout=layout,
                                             positions=positions, **extra, **options)


def attention_in_layout(q, k, v, *, mesh, axis="sequence", impl="ring", layout="zigzag",
                        causal=False, window=None, positions=None, segment_ids=None, scale=None,
                        **options):
    """Sequence-parallel attention of arrays already in layout order.

    Args:
      q: [B, T, H, D] float32 or bfloat16, in `layout` order (sharded or not).
      k, v: [B, T, K, D], H % K == 0, in the same order.
      mesh: a `jax.sharding.Mesh`; `axis` names the sequence axis (n devices).
      impl: "ring" (K/V walk the ring), "allgather" (gather K/V, then local
        blockwise) or "linear" (delegated to `lca.parallel.linear`).
      layout: "contiguous", "striped" or "zigzag": which tokens each shard
        holds (`lca.layouts`); T must be a multiple of n (contiguous), 2n
        (zigzag) or n * stripe (striped).
      causal, window, scale: as in `lca.attention`, on global positions.
      positions: int [T] or [B, T], the global position of each token in
        layout order; default `lca.layouts.positions(T, layout, n, stripe)`.
        With a causal window on the contiguous layout the ring takes only the
        steps the window reaches, which assumes positions grow by at least
        one per token within a segment (true for arange and for positions
        that restart at each packed document).
      segment_ids: int [B, T] in layout order; attend within equal ids.
      **options: block_q, block_k (tile lengths of each shard's blockwise
        attention; default `default_block(layout, T, n, H // K)`), and
        stripe (striped layout's stripe width, default 1). For "linear", every
        option goes to `lca.parallel.linear.attention_in_layout_linear`.

    Returns:
      [B, T, H, D] in q's dtype, in layout order, sharded like the input:
      batch on data/fsdp, sequence on `axis`, heads on tensor.
    """
    _check_names(mesh, axis, impl, layout)
    if impl == "linear":
        return _delegate_linear(q, k, v, mesh, axis, layout, positions, causal, window,
                                segment_ids, scale, options)
    _check_softmax(q, k, v, mesh, axis, layout, causal, window, positions, segment_ids, scale,
                   options)
    n = mesh.shape[axis]
    seq_len, shard_len = q.shape[1], q.shape[1] // n
    stripe = options.get("stripe", 1)
    block = default_block(layout, seq_len, n, q.shape[2] // k.shape[2])
    kernel_options = {"block_q": options.get("block_q", block),
                      "block_k": options.get("block_k", block)}
    if impl == "ring":
        kernel = ring_attention
        if layout == "contiguous" and causal and window is not None:
            kernel_options["max_steps"] = window_steps(window, shard_len, n)
    else:
        kernel = allgather_attention

    batch_axes, head_axis = _mesh_axes(mesh, axis)
    batch_spec = batch_axes or None
    if positions is None:
        positions = layouts.positions(seq_len, layout, n, stripe)
    positions = jnp.asarray(positions, jnp.int32)
    pos_spec = P(axis) if positions.ndim == 1 else P(batch_spec, axis)
    heads_spec = P(batch_spec, axis, head_axis, None)
    args, specs = [q, k, v, positions], [heads_spec, heads_spec, heads_spec, pos_spec]
    if segment_ids is not None:
        args.append(segment_ids)
        specs.append(P(batch_spec, axis))

    def per_shard(q, k, v, pos, seg=None):
        return kernel(q, k, v, axis_name=axis, causal=causal, window=window, segment_ids=seg,
                      positions=pos, scale=scale, **kernel_options)

    return jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(specs),
                         out_specs=heads_spec)(*args)


def sequence_parallel_attention(q, k, v, *, mesh, axis="sequence", impl="ring", layout="zigzag",
                                causal=False, window=None, segment_ids=None, scale=None,
                                **options):
    """Sequence-parallel attention in natural token order.

    Permutes q, k, v (and segment ids; for "linear", a per-token [B, T, H]
    `log_decay` too) into `layout` order, runs `attention_in_layout`, and
    permutes the output back. Arguments as in `attention_in_layout`.

    Returns:
      [B, T, H, D] in q's dtype, in natural order.
    """
    _check_names(mesh, axis, impl, layout)
    if impl != "linear":
        _check_softmax(q, k, v, mesh, axis, layout, causal, window, None, segment_ids, scale,
                       options)
    n = mesh.shape[axis]
    stripe = options.get("stripe", 1)
    permute = lambda x: layouts.permute(x, layout, n, axis=1, stripe=stripe)
    if segment_ids is not None and np.ndim(segment_ids) == 2:
        segment_ids = permute(segment_ids)
    log_decay = options.get("log_decay")
    if impl == "linear" and log_decay is not None and np.ndim(log_decay) == 3:
        options = dict(options, log_decay=permute(log_decay))  # per token; [H] stays
    out = attention_in_layout(
        permute(q), permute(k), permute(v), mesh=mesh, axis=axis, impl=impl, layout=layout,
        causal=causal, window=window, segment_ids=segment_ids, scale=scale, **options)
    return layouts.unpermute(out, layout, n, axis=1, stripe=stripe)
