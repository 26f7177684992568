"""`jax.nn.dot_product_attention`: the dense baseline users already know.

Causal masks and sliding windows on the natural order (q_len == kv_len) go to XLA's own
`is_causal` / `local_window_size`. Segment ids and explicit positions are
expressed as a dense boolean [B, 1, T, S] mask, since the function has no
other way to take them; rows that see no key are zeroed afterwards, because
the function returns the mean of V for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lca.kernels import masks as masks_lib
from lca.kernels.local import LocalKernel
from lca.kernels.validation import check_attention_args


def xla_attention(q, k, v, *, causal=False, window=None, segment_ids=None,
                  kv_segment_ids=None, positions=None, kv_positions=None, scale=None,
                  implementation=None):
    """Same contract as `lca.attention`; [B, T, H, D] in q's dtype."""
    batch, q_len, kv_len = check_attention_args(
        q, k, v, causal=causal, window=window, segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids, positions=positions, kv_positions=kv_positions,
        scale=scale)
    # XLA aligns its causal window differently when q_len != kv_len; our
    # positions say what the mask is, so any such case goes through them.
    dense = (segment_ids is not None or positions is not None or kv_positions is not None
             or (causal and q_len != kv_len))
    if not dense:
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal,
            local_window_size=None if window is None else (window - 1, 0),
            implementation=implementation)
    arrays = masks_lib.make_mask_arrays(
        batch, q_len, kv_len, positions=positions, kv_positions=kv_positions,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
    mask_BTS = masks_lib.visible(
        masks_lib.MaskSpec(causal, window, segment_ids is not None), *arrays)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask_BTS[:, None], scale=scale,
                                       implementation=implementation)
    return jnp.where(mask_BTS.any(-1)[:, :, None, None], out, 0).astype(q.dtype)


KERNEL = LocalKernel(
    "xla", None, None, tiles=None, direct=xla_attention, baseline=True,
    doc="jax.nn.dot_product_attention, differentiated by XLA: the dense baseline, one device")
