"""Small NNX building blocks: parameters with logical axis names, RMSNorm, SwiGLU, RoPE.

Dimension legend: B batch, T length (layout order), E embed, H heads,
K kv heads, D head_dim, F mlp, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lca.parallel.sharding import ShardingContext, constrain

F32 = jnp.float32


def param(rngs: nnx.Rngs, shape, logical, *, std=None, fan_in=None, value=None):
    """A float32 `nnx.Param` named by logical axes (placed later, by `lca.parallel.sharding`).

    Initialised from N(0, std^2), std = fan_in ** -0.5 by default; or to `value`.
    """
    if value is None:
        std = (fan_in ** -0.5) if std is None else std
        value = std * jax.random.normal(rngs.params(), shape, F32)
    return nnx.Param(jnp.asarray(value, F32), out_sharding=tuple(logical), eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("embed",), value=jnp.ones((dim,)))
        self.eps = eps

    def __call__(self, x_BTE):
        x = x_BTE.astype(F32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(x_BTE.dtype)


class SwiGLU(nnx.Module):
    """out = W_down (silu(x W_gate) * x W_up)."""

    def __init__(self, embed: int, mlp: int, *, rngs: nnx.Rngs):
        self.w_gate = param(rngs, (embed, mlp), ("embed", "mlp"), fan_in=embed)
        self.w_up = param(rngs, (embed, mlp), ("embed", "mlp"), fan_in=embed)
        self.w_down = param(rngs, (mlp, embed), ("mlp", "embed"), fan_in=mlp)

    def __call__(self, x_BTE, ctx: ShardingContext | None):
        dt = x_BTE.dtype
        gate_BTF = x_BTE @ self.w_gate[...].astype(dt)
        up_BTF = x_BTE @ self.w_up[...].astype(dt)
        h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"), ctx)
        return h_BTF @ self.w_down[...].astype(dt)


def rope(x_BTHD, positions_BT, base: float):
    """Rotary embedding driven by explicit positions (so any token layout is right).

    Rotates the two halves of head_dim; angles are computed in float32.
    """
    d = x_BTHD.shape[-1]
    half = d // 2
    inv_freq = base ** (-jnp.arange(half, dtype=F32) / half)
    angles_BTd = positions_BT.astype(F32)[..., None] * inv_freq
    sin = jnp.sin(angles_BTd)[:, :, None, :]
    cos = jnp.cos(angles_BTd)[:, :, None, :]
    x = x_BTHD.astype(F32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)
