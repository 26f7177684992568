"""`lca.attention`: every local kernel of the registry on one device, one entry point."""

from __future__ import annotations

import difflib
import inspect

from lca.kernels import local as local_lib
from lca.kernels import masks as masks_lib
from lca.kernels import registry
from lca.kernels.validation import check_attention_args


def attention(q, k, v, *, impl=registry.DEFAULT_LOCAL, causal=False, window=None, segment_ids=None,
              kv_segment_ids=None, positions=None, kv_positions=None, scale=None,
              block_q=None, block_k=None, return_lse=False, **options):
    """Exact softmax attention on one device.

    Args:
      q: [batch, q_len, heads, head_dim], float32 or bfloat16.
      k, v: [batch, kv_len, kv_heads, head_dim], heads % kv_heads == 0.
      impl: a local kernel of `lca.kernels.registry`: "blockwise" (tiled,
        memory linear in length), "xla" (`jax.nn.dot_product_attention`),
        "reference" (the dense autodiff oracle; float64 works), or any
        registered one.
      causal: query i sees key j only if positions[i] >= kv_positions[j].
      window: with causal, also positions[i] - kv_positions[j] < window.
      segment_ids, kv_segment_ids: int [batch, len]; attend only within equal
        ids; kv_segment_ids defaults to segment_ids.
      positions, kv_positions: int [len] or [batch, len]; default arange(len).
      scale: logit scale, default head_dim ** -0.5.
      block_q, block_k: tile lengths of a tiled kernel; default the kernel's
        (`lca.kernels.local.default_tiles`); lengths need not be multiples.
      return_lse: also return the float32 log-sum-exp [batch, q_len, heads]
        (-inf for a query that sees no key); not for "xla".
      **options: passed to a kernel that runs whole (`LocalKernel.direct`),
        e.g. implementation="cudnn" for "xla".

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype; a query that sees no key
      gets zeros.
    """
    _check_options(impl, options)
    batch, q_len, kv_len = check_attention_args(
        q, k, v, causal=causal, window=window, segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids, positions=positions, kv_positions=kv_positions,
        scale=scale)
    spec = masks_lib.MaskSpec(bool(causal), window, segment_ids is not None)
    kernel = registry.local_kernel(impl, q=q, k=k, spec=spec)
    mask = dict(causal=causal, window=window, segment_ids=segment_ids,
                kv_segment_ids=kv_segment_ids, positions=positions, kv_positions=kv_positions,
                scale=scale)
    if kernel.tiles is None and (block_q or block_k):
        raise ValueError(f"impl={impl!r} takes no tiles; got block_q={block_q},"
                         f" block_k={block_k}")
    if return_lse and not kernel.shards:
        raise ValueError(f"impl={impl!r} does not return the log-sum-exp")
    if kernel.direct is not None:
        return kernel.direct(q, k, v, **mask, **options,
                             **({"return_lse": True} if return_lse else {}))
    # One device: the natural order is the placement a static-mask kernel (splash) is
    # built for; explicit positions that differ from it run its exact fallback.
    cfg = local_lib.config(kernel, q, k, causal=causal, window=window,
                           segments=segment_ids is not None, scale=scale, block_q=block_q,
                           block_k=block_k,
                           placement=local_lib.Placement("contiguous", q_len, kv_len=kv_len))
    arrays = masks_lib.make_mask_arrays(
        batch, q_len, kv_len, positions=positions, kv_positions=kv_positions,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
    out, lse = local_lib.attend(kernel, cfg, q, k, v, arrays)
    return (out, lse) if return_lse else out


def _check_options(impl, options):
    """Options beyond lca.attention's own are the direct kernel's; name anything else."""
    if not options:
        return
    kernel = registry.local_kernel(impl)
    own = [n for n in inspect.signature(attention).parameters if n not in ("q", "k", "v",
                                                                           "options")]
    extra = [] if kernel.direct is None else [
        n for n in inspect.signature(kernel.direct).parameters
        if n not in own and n not in ("q", "k", "v")]
    unknown = sorted(set(options) - set(extra))
    if unknown:
        near = [m for u in unknown for m in difflib.get_close_matches(u, own + extra, n=1)]
        raise ValueError(
            f"lca.attention got unknown argument(s) {unknown}"
            + (f" (did you mean {', '.join(near)}?)" if near else "")
            + f"; it takes {', '.join(own)}"
            + (f", and for impl={impl!r} {', '.join(extra)}" if extra else ""))
