"""Dense softmax attention: the oracle every other kernel is tested against.

Dimension legend: B batch, T query length, S key/value length, H query heads,
K kv heads, G = H // K query heads per kv head, D head_dim.

It materialises the [B, H, T, S] logits, so it is for tests and small inputs.
It computes in float32, or in float64 when given float64 inputs.

`reference_attention` is the oracle: plain jnp operations, differentiated by
JAX's autodiff, so nothing in it is hand-written twice. `forward` and
`backward` are the same mathematics as a local kernel (`lca.kernels.local`),
so any strategy can run densely on the tokens a device holds; their
gradients are checked against the oracle's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lca.kernels import local
from lca.kernels import masks as masks_lib
from lca.kernels.validation import check_attention_args


def _logits(cfg, q, k, arrays):
    """Masked scaled logits [B, K, G, T, S] in the compute dtype, and the mask [B, T, S]."""
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q_BTKGD = q.astype(dtype).reshape(b, t, kv_heads, h // kv_heads, d)
    s = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k.astype(dtype)) * cfg.scale
    mask_BTS = masks_lib.visible(cfg.spec, *arrays)
    return jnp.where(mask_BTS[:, None, None], s, -jnp.inf), mask_BTS


def _heads_last(x_BKGT, batch, length):
    """[B, K, G, T(, D)] -> [B, T, H(, D)]."""
    x = jnp.moveaxis(x_BKGT, 3, 1)
    return x.reshape((batch, length, -1) + x.shape[4:])


def forward(cfg: local.LocalConfig, q, k, v, arrays: masks_lib.MaskArrays):
    """Output [B, T, H, D] and log-sum-exp [B, T, H] in the compute dtype; unseen rows 0, -inf."""
    s, _ = _logits(cfg, q, k, arrays)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    seen = l > 0
    o = jnp.einsum("bkgts,bskd->bkgtd", p, v.astype(s.dtype)) / jnp.where(seen, l, 1.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)[..., 0]
    b, t = q.shape[:2]
    return _heads_last(o, b, t), _heads_last(lse, b, t)


def backward(cfg: local.LocalConfig, q, k, v, arrays: masks_lib.MaskArrays, lse, do, delta):
    """(dq, dk, dv) in the compute dtype: this K/V's exact part, given the global lse."""
    s, _ = _logits(cfg, q, k, arrays)
    dtype = s.dtype
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    rows = lambda x: jnp.moveaxis(x.astype(dtype).reshape(b, t, kv_heads, h // kv_heads), 1, 3)
    lse_rows = rows(jnp.where(jnp.isfinite(lse), lse, 0.0))  # unseen rows: all logits -inf
    p = jnp.exp(s - lse_rows[..., None])
    do_BTKGD = do.astype(dtype).reshape(b, t, kv_heads, h // kv_heads, d)
    dv = jnp.einsum("bkgts,btkgd->bskd", p, do_BTKGD)
    dp = jnp.einsum("btkgd,bskd->bkgts", do_BTKGD, v.astype(dtype))
    ds = p * (dp - rows(delta)[..., None]) * cfg.scale
    q_BTKGD = q.astype(dtype).reshape(b, t, kv_heads, h // kv_heads, d)
    dq = jnp.einsum("bkgts,bskd->btkgd", ds, k.astype(dtype)).reshape(q.shape)
    dk = jnp.einsum("bkgts,btkgd->bskd", ds, q_BTKGD)
    return dq, dk, dv


def reference_attention(q, k, v, *, causal=False, window=None, segment_ids=None,
                        kv_segment_ids=None, positions=None, kv_positions=None,
                        scale=None, return_lse=False):
    """Dense attention, differentiated by autodiff: the oracle.

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
    cfg = local.LocalConfig(masks_lib.MaskSpec(causal, window, segment_ids is not None),
                            float(q.shape[-1] ** -0.5 if scale is None else scale), 0, 0)
    out, lse = forward(cfg, q, k, v, arrays)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


KERNEL = local.LocalKernel(
    "reference", forward, backward, tiles=None, direct=reference_attention, bench=False,
    doc="dense [T, S] logits, float64-capable; on one device the autodiff oracle")
