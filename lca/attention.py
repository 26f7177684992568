"""`lca.attention`: one entry point, one registry of single-device kernels."""

from __future__ import annotations

from lca.kernels import blockwise_attention, reference_attention, xla_attention

# Name -> kernel. Every kernel takes (q, k, v, *, causal, window, segment_ids,
# kv_segment_ids, positions, kv_positions, scale, **options).
KERNELS = {
    "reference": reference_attention,
    "xla": xla_attention,
    "blockwise": blockwise_attention,
}


def attention(q, k, v, *, impl="blockwise", causal=False, window=None, segment_ids=None,
              kv_segment_ids=None, positions=None, kv_positions=None, scale=None,
              **options):
    """Exact softmax attention on one device.

    Args:
      q: [batch, q_len, heads, head_dim], float32 or bfloat16.
      k, v: [batch, kv_len, kv_heads, head_dim], heads % kv_heads == 0.
      impl: "blockwise" (tiled, memory linear in length), "xla"
        (`jax.nn.dot_product_attention`) or "reference" (dense oracle; float64
        works; `return_lse=True` also returns the log-sum-exp).
      causal: query i sees key j only if positions[i] >= kv_positions[j].
      window: with causal, also positions[i] - kv_positions[j] < window.
      segment_ids, kv_segment_ids: int [batch, len]; attend only within equal
        ids; kv_segment_ids defaults to segment_ids.
      positions, kv_positions: int [len] or [batch, len]; default arange(len).
      scale: logit scale, default head_dim ** -0.5.
      **options: passed to the kernel (blockwise: block_q, block_k, return_lse).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype; a query that sees no key
      gets zeros.
    """
    if impl not in KERNELS:
        raise ValueError(f"impl must be one of {sorted(KERNELS)}; got {impl!r}")
    return KERNELS[impl](q, k, v, causal=causal, window=window, segment_ids=segment_ids,
                         kv_segment_ids=kv_segment_ids, positions=positions,
                         kv_positions=kv_positions, scale=scale, **options)
