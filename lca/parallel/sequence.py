"""Sequence-parallel attention: global arrays in, `jax.shard_map` over a mesh axis inside.

Dimension legend: B batch, T sequence length (global), H query heads,
K kv heads, D head_dim, n devices on the sequence axis.

Two entry points:

  attention_in_layout          arrays already in layout order (a model permutes
                               once at its input); returns layout order.
  sequence_parallel_attention  natural order in and out: permute, attend,
                               unpermute.

`impl` names a strategy of `lca.kernels.registry` (ring, allgather, ...), which
runs the local kernel `local` names on each shard, or the linear family. The
sequence dimension is sharded on `axis`; batch and heads as the activation
rules say (`lca.parallel.sharding`; by default batch on data and fsdp, heads
on tensor), the same specs the model's activation constraints use. Every
argument is checked on shapes before anything compiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lca import layouts
from lca.kernels import local as local_lib
from lca.kernels import registry
from lca.kernels.masks import MaskSpec
from lca.kernels.validation import check_attention_args, check_block
from lca.parallel.sharding import DEFAULT_ACTIVATION_RULES, activation_spec

_SOFTMAX_OPTIONS = ("block_q", "block_k", "stripe")
TOKENS = ("batch", "length", "heads", "head_dim")
KV_TOKENS = ("batch", "length", "kv_heads", "head_dim")


def _strategy(mesh, axis, impl, layout):
    """The registry entry `impl` names (a strategy or the linear family), checked."""
    entry = registry.get(impl, ("strategy", "linear"), "sequence-parallel impl")
    layouts.check_layout_name(layout)
    sequence_axes(mesh, axis, entry)
    return entry


def sequence_axes(mesh, axis, entry=None):
    """(the sequence's spec axes, ring-major; the layout's shards n; all the shards).

    `axis` is one mesh axis, or (all-to-all axis, ring axis) for a strategy
    that takes two (`Strategy.axes`; the linear family takes either): the
    sequence is then sharded over both, the ring axis major, and the layout is
    over the ring axis.
    """
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    want = getattr(entry, "axes", None)
    if not 1 <= len(names) <= 2 or len(set(names)) != len(names):
        raise ValueError(f"axis must be one mesh axis or two different ones (all-to-all axis,"
                         f" ring axis); got {axis!r}")
    for name in names:
        if name not in mesh.axis_names:
            raise ValueError(f"axis={name!r} is not an axis of the mesh; its axes are"
                             f" {list(mesh.axis_names)}")
    if want is not None and len(names) != want:
        form = "one mesh axis" if want == 1 else "axis=(all-to-all axis, ring axis)"
        raise ValueError(f"impl={entry.name!r} takes {form}; got axis={axis!r}")
    spec = names[0] if len(names) == 1 else names[::-1]
    n = mesh.shape[names[-1]]
    return spec, n, int(np.prod([mesh.shape[a] for a in names]))


def check_length(seq_len, layout, n, total, stripe=1):
    """The layout over n shards fits, and every one of the `total` devices gets as much."""
    layouts.check_layout(seq_len, layout, n, stripe)
    m = int(np.lcm(layouts.multiple(layout, n, stripe), total))
    if seq_len % m:
        near = [x for x in ((seq_len // m) * m, (seq_len // m + 1) * m) if x]
        raise ValueError(f"sequence length {seq_len} does not split over the {total} devices of"
                         f" the sequence axes with layout={layout!r} over {n}: it must be a"
                         f" multiple of {m}; nearest valid lengths: {near}")


def specs(mesh, axis, rules, q_shape, k_shape):
    """(q spec, k/v spec, [B, T] spec) of the kernel's `shard_map`, from the rules.

    The same specs `lca.parallel.sharding.constrain` gives the activations,
    with the sequence on `axis` (a mesh axis or a ring-major pair of them).
    Query and kv heads must split over the same mesh axes (a shard's query
    heads need their own kv heads).
    """
    rules = DEFAULT_ACTIVATION_RULES if rules is None else rules
    q_spec = activation_spec(TOKENS, rules, mesh, q_shape, axis)
    k_spec = activation_spec(KV_TOKENS, rules, mesh, k_shape, axis)
    if q_spec[1] != axis:
        raise ValueError(f"the rules do not shard the sequence of {q_shape[1]} tokens over"
                         f" mesh axes {axis!r}")
    if q_spec[2] != k_spec[2]:
        split = [q_spec[2]] if isinstance(q_spec[2], str) else list(q_spec[2] or ())
        size = int(np.prod([mesh.shape[a] for a in split]))
        near = [x for x in ((k_shape[2] // size) * size, (k_shape[2] // size + 1) * size) if x]
        raise ValueError(f"kv_heads {k_shape[2]} does not divide by the mesh axes {split} of"
                         f" size {size} that split the {q_shape[2]} query heads; nearest valid"
                         f" kv_heads: {near}")
    return q_spec, k_spec, P(q_spec[0], axis)


def _device_shape(shape, spec, mesh):
    """[B, T, H, D] with the heads one device holds under `spec` (B and T as given)."""
    split = spec[2] if len(spec) > 2 else None
    names = [split] if isinstance(split, str) else list(split or ())
    return shape[:2] + (shape[2] // int(np.prod([mesh.shape[a] for a in names])),) + shape[3:]


def _check_softmax(q, k, v, mesh, axis, impl, layout, local, causal, window, positions,
                   segment_ids, scale, options):
    unknown = sorted(set(options) - set(_SOFTMAX_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for softmax sequence-parallel attention;"
            f" valid options: {list(_SOFTMAX_OPTIONS)}")
    _, seq_len, kv_len = check_attention_args(
        q, k, v, causal=causal, window=window, segment_ids=segment_ids, positions=positions,
        scale=scale)
    if kv_len != seq_len:
        raise ValueError(
            f"sequence-parallel attention attends a sequence to itself: k/v length {kv_len}"
            f" must equal q length {seq_len}")
    for name in ("block_q", "block_k"):
        if name in options:
            check_block(name, options[name])
    entry = registry.get(impl)
    _, n, total = sequence_axes(mesh, axis, entry)
    check_length(seq_len, layout, n, total, options.get("stripe", 1))
    shard = lambda x: jax.ShapeDtypeStruct((x.shape[0], seq_len // n) + x.shape[2:], x.dtype)
    kernel = registry.local_kernel(local, q=shard(q), k=shard(k), spec=MaskSpec(
        bool(causal), window, segment_ids is not None), strategy=impl)
    return kernel


def _delegate_linear(q, k, v, mesh, axis, layout, positions, causal, window, segment_ids, scale,
                     rules, options):
    from lca.parallel import linear  # the linear family's own entry point

    # Linear attention is causal by construction; softmax-only options pass on
    # only when set, so the linear entry point can reject what it lacks.
    extra = {name: value for name, value in
             (("window", window), ("segment_ids", segment_ids), ("scale", scale))
             if value is not None}
    return linear.attention_in_layout_linear(q, k, v, mesh=mesh, axis=axis, layout=layout,
                                             positions=positions, rules=rules, **extra,
                                             **options)


def attention_in_layout(q, k, v, *, mesh, axis="sequence", impl=registry.DEFAULT_STRATEGY,
                        local=None, layout="zigzag", causal=False, window=None, positions=None,
                        segment_ids=None, scale=None, rules=None, **options):
    """Sequence-parallel attention of arrays already in layout order.

    Args:
      q: [B, T, H, D] float32 or bfloat16, in `layout` order (sharded or not).
      k, v: [B, T, K, D], H % K == 0, in the same order.
      mesh: a `jax.sharding.Mesh`; `axis` names the sequence axis (n devices),
        or for "usp" a pair (all-to-all axis, ring axis): the sequence sharded
        over both, ring-major, the layout over the ring axis.
      impl: a strategy of `lca.kernels.registry`: "ring" (K/V walk the
        ring), "allgather" (gather K/V, then the local kernel), "ulysses"
        (all-to-all: every token of H / n heads), "usp" (all-to-all, then the
        ring), ...; or "linear" (delegated to `lca.parallel.linear`).
      local: the local kernel each shard runs (a registry name; default
        `registry.DEFAULT_LOCAL`, "blockwise"); "reference" runs densely.
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
      rules: activation rules (`lca.parallel.sharding`) placing batch and
        heads; default `DEFAULT_ACTIVATION_RULES`. A dimension that does not
        divide by its mesh axes is replicated over them, as the model's
        activation constraints do.
      **options: block_q, block_k (tile lengths of each shard's local kernel;
        default `local.default_tiles` for the layout and head grouping), and
        stripe (striped layout's stripe width, default 1). For "linear", every
        option goes to `lca.parallel.linear.attention_in_layout_linear`.

    Returns:
      [B, T, H, D] in q's dtype, in layout order, sharded as the rules say.
    """
    entry = _strategy(mesh, axis, impl, layout)
    if entry.kind == "linear":
        return _delegate_linear(q, k, v, mesh, axis, layout, positions, causal, window,
                                segment_ids, scale, rules, options)
    kernel = _check_softmax(q, k, v, mesh, axis, impl, layout, local, causal, window,
                            positions, segment_ids, scale, options)
    seq_spec, n, _ = sequence_axes(mesh, axis, entry)
    q_spec, k_spec, ids_spec = specs(mesh, seq_spec, rules, q.shape, k.shape)
    sizes = tuple((a, mesh.shape[a]) for a in ((axis,) if isinstance(axis, str) else axis))
    shapes = (_device_shape(q.shape, q_spec, mesh), _device_shape(k.shape, k_spec, mesh),
              sizes)  # the heads one device holds
    if entry.check is not None:
        entry.check(*shapes)
    heads, kv_heads = (entry.local_heads(*shapes) if entry.local_heads is not None
                       else (q.shape[2], k.shape[2]))  # as the local kernel sees them
    seq_len, shard_len = q.shape[1], q.shape[1] // n
    stripe = options.get("stripe", 1)
    block = local_lib.default_tiles(kernel, heads // kv_heads, layout, shard_len)
    shard_options = {"block_q": options.get("block_q", block or None),
                     "block_k": options.get("block_k", block or None)}  # 0: takes no tiles
    if entry.layout_options is not None:
        shard_options.update(entry.layout_options(layout, causal, window, shard_len, n,
                                                  stripe=stripe))
    if entry.view is not None:
        shard_options["placement"] = local_lib.Placement(layout, seq_len, n, stripe,
                                                         entry.view)
    if positions is None:
        positions = layouts.positions(seq_len, layout, n, stripe)
    positions = jnp.asarray(positions, jnp.int32)
    args = [q, k, v, positions]
    in_specs = [q_spec, k_spec, k_spec, P(seq_spec) if positions.ndim == 1 else ids_spec]
    if segment_ids is not None:
        args.append(segment_ids)
        in_specs.append(ids_spec)

    names = axis if isinstance(axis, str) else tuple(axis)

    def per_shard(q, k, v, pos, seg=None):
        return entry.shard_fn(q, k, v, axis_name=names, local=kernel, causal=causal,
                              window=window, segment_ids=seg, positions=pos, scale=scale,
                              **shard_options)

    return jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(in_specs), out_specs=q_spec,
                         check_vma=kernel.typed_vma)(*args)


def sequence_parallel_attention(q, k, v, *, mesh, axis="sequence", impl=registry.DEFAULT_STRATEGY,
                                local=None, layout="zigzag", causal=False, window=None,
                                segment_ids=None, scale=None, rules=None, **options):
    """Sequence-parallel attention in natural token order.

    Permutes q, k, v (and segment ids; for "linear", a per-token [B, T, H]
    `log_decay` too) into `layout` order, runs `attention_in_layout`, and
    permutes the output back. Arguments as in `attention_in_layout`.

    Returns:
      [B, T, H, D] in q's dtype, in natural order (for "linear" with
      return_state=True, with the state after the last token).
    """
    entry = _strategy(mesh, axis, impl, layout)
    if entry.kind != "linear":
        _check_softmax(q, k, v, mesh, axis, impl, layout, local, causal, window, None,
                       segment_ids, scale, options)
    _, n, _ = sequence_axes(mesh, axis, entry)
    stripe = options.get("stripe", 1)
    permute = lambda x: layouts.permute(x, layout, n, axis=1, stripe=stripe)
    if segment_ids is not None and np.ndim(segment_ids) == 2:
        segment_ids = permute(segment_ids)
    log_decay = options.get("log_decay")
    if entry.kind == "linear" and log_decay is not None and np.ndim(log_decay) == 3:
        options = dict(options, log_decay=permute(log_decay))  # per token; [H] stays
    out = attention_in_layout(
        permute(q), permute(k), permute(v), mesh=mesh, axis=axis, impl=impl, local=local,
        layout=layout, causal=causal, window=window, segment_ids=segment_ids, scale=scale,
        rules=rules, **options)
    unpermute = lambda x: layouts.unpermute(x, layout, n, axis=1, stripe=stripe)
    if entry.kind == "linear" and options.get("return_state"):
        return unpermute(out[0]), out[1]  # the final state has no token axis
    return unpermute(out)
