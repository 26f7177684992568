"""Dense softmax attention: the oracle every other kernel is tested against.

Dimension legend: B batch, T query length, S key/value length, H query heads,
K kv heads, G = H // K query heads per kv head, D head_dim.

It materialises the [B, H, T, S] logits, so it is for tests and small inputs.
It computes in float32, or in float64 when given float64 inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lca.kernels import masks as masks_lib
from lca.kernels.validation import check_attention_args


def reference_attention(q, k, v, *, causal=False, window=None, segment_ids=None,
                        kv_segment_ids=None, positions=None, kv_positions=None,
                        scale=None, return_lse=False):
    """Dense attention.

    Args:
      q: [B, T, H, D]; k, v: [B, S, K, D] with H % K == 0.
      causal, window, segment_ids, kv_segment_ids, positions, kv_positions:
        the mask, as in `lca.attention`.
      scale: logit scale, default D ** -0.5.
      return_lse: also return the log-sum-exp of the scaled logits.

    Returns:
      [B, T, H, D] in q's dtype, and with `return_lse` the log-sum-exp
      [B, T, H] in the compute dtype (float32, or float64 for float64 inputs);
      -inf for a query that sees no key, whose output is zero.
    """
    batch, q_len, kv_len = check_attention_args(
        q, k, v, causal=causal, window=window, segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids, positions=positions, kv_positions=kv_positions,
        scale=scale)
    arrays = masks_lib.make_mask_arrays(
        batch, q_len, kv_len, positions=positions, kv_positions=kv_positions,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
    spec = masks_lib.MaskSpec(causal, window, segment_ids is not None)
    mask_BTS = masks_lib.visible(spec, *arrays)

    dtype = jnp.promote_types(q.dtype, jnp.float32)
    _, _, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    q_BTKGD = q.astype(dtype).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k.astype(dtype)) * scale
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, -jnp.inf)

    m = jax.lax.stop_gradient(s_BKGTS.max(-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s_BKGTS - m)
    l = p.sum(-1, keepdims=True)
    seen = l > 0
    o_BKGTD = jnp.einsum("bkgts,bskd->bkgtd", p, v.astype(dtype)) / jnp.where(seen, l, 1.0)
    out = o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)[..., 0]
    return out, lse.transpose(0, 3, 1, 2).reshape(batch, q_len, heads)
