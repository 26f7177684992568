"""Grouped-query attention layer: projections, RoPE, and a kernel named in the config.

Dimension legend: B batch, T length (layout order), E embed, H heads,
K kv heads, D head_dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lca.models import kernels
from lca.models.config import ModelConfig
from lca.models.layers import param, rope
from lca.parallel.sharding import ShardingContext, constrain


class Attention(nnx.Module):
    """q/k/v projections, RoPE from the tokens' positions, the named kernel, output projection.

    The kernel's adapter (`lca.models.kernels`) may own parameters of its own
    (a linear layer's decay and feature-map weights): `kernel_params`.
    """

    def __init__(self, config: ModelConfig, kernel: str, *, rngs: nnx.Rngs):
        e, h, kh, d = config.embed, config.heads, config.kv_heads, config.head_dim
        self.config = config
        self.call = kernels.KernelCall.from_config(config, kernel)
        self.wq = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), fan_in=e)
        self.wk = param(rngs, (e, kh, d), ("embed", "kv_heads", "head_dim"), fan_in=e)
        self.wv = param(rngs, (e, kh, d), ("embed", "kv_heads", "head_dim"), fan_in=e)
        self.wo = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), fan_in=h * d)
        self.kernel_params = kernels.adapter(kernel).params(config, rngs)

    def qkv(self, x_BTE, positions_BT):
        """Projected and rotated q [B, T, H, D], k and v [B, T, K, D]."""
        dt, base = x_BTE.dtype, self.config.rope_base
        q = jnp.einsum("bte,ehd->bthd", x_BTE, self.wq[...].astype(dt))
        k = jnp.einsum("bte,ekd->btkd", x_BTE, self.wk[...].astype(dt))
        v = jnp.einsum("bte,ekd->btkd", x_BTE, self.wv[...].astype(dt))
        return rope(q, positions_BT, base), rope(k, positions_BT, base), v

    def __call__(self, x_BTE, positions_BT, mask_positions, segment_ids,
                 ctx: ShardingContext | None):
        q, k, v = self._qkv(x_BTE, positions_BT, ctx)
        out_BTHD = kernels.adapter(self.call.name)(q, k, v, self.call, ctx, mask_positions,
                                                   segment_ids, self.kernel_params)
        return self._out(out_BTHD, ctx)

    def prefill(self, x_BTE, positions_BT, mask_positions, ctx: ShardingContext | None):
        """(the layer's output, its cache entry: K/V [B, T, K, D] in layout order, or a
        linear layer's final state)."""
        q, k, v = self._qkv(x_BTE, positions_BT, ctx)
        out_BTHD, entry = kernels.adapter(self.call.name).prefill(
            q, k, v, self.call, ctx, mask_positions, self.kernel_params)
        return self._out(out_BTHD, ctx), entry

    def decode(self, x_B1E, entry, view, ctx: ShardingContext | None):
        """One new token per sequence, at position `view.length`: (output [B, 1, E], entry)."""
        positions = jnp.broadcast_to(view.length, x_B1E.shape[:2])
        q, k, v = self._qkv(x_B1E, positions, ctx)
        out_B1HD, entry = kernels.adapter(self.call.name).decode(
            q, k, v, entry, view, self.call, ctx, self.kernel_params)
        return self._out(out_B1HD, ctx), entry

    def _qkv(self, x_BTE, positions_BT, ctx):
        q, k, v = self.qkv(x_BTE, positions_BT)
        return (constrain(q, ("batch", "length", "heads", "head_dim"), ctx),
                constrain(k, ("batch", "length", "kv_heads", "head_dim"), ctx),
                constrain(v, ("batch", "length", "kv_heads", "head_dim"), ctx))

    def _out(self, out_BTHD, ctx):
        out_BTHD = constrain(out_BTHD, ("batch", "length", "heads", "head_dim"), ctx)
        return jnp.einsum("bthd,hde->bte", out_BTHD, self.wo[...].astype(out_BTHD.dtype))
