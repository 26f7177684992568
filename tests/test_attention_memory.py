"""Compiled memory: blockwise attention is linear in length, dense XLA is quadratic."""

import jax
import jax.numpy as jnp

import lca


def temp_bytes(impl, seq_len, heads=4, head_dim=64):
    x = jax.ShapeDtypeStruct((1, seq_len, heads, head_dim), jnp.float32)

    def loss(q, k, v):
        return lca.attention(q, k, v, impl=impl, causal=True).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_forward_backward_needs_under_5_percent_of_xla_at_8k():
    blockwise, xla = temp_bytes("blockwise", 8192), temp_bytes("xla", 8192)
    assert xla > 8192 * 8192 * 4 * 4  # at least the [B, H, T, T] float32 logits
    assert blockwise < 0.05 * xla, f"blockwise {blockwise} B vs xla {xla} B"


def test_blockwise_memory_is_linear_in_length():
    small, large = temp_bytes("blockwise", 4096), temp_bytes("blockwise", 8192)
    assert large <= 2.1 * small, f"T=4096: {small} B, T=8192: {large} B"
