"""Grouped-query attention layer: projections, RoPE, and a kernel named in the config.

Dimension legend: B batch, T length (layout order), E embed, H heads,
K kv heads, D head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lca.models import kernels
from lca.models.config import ModelConfig
from lca.models.layers import param, rope
from lca.parallel.sharding import ShardingContext, constrain


class Attention(nnx.Module):
    """q/k/v projections, RoPE from the tokens' positions, the named kernel, output projection.

    A `linear` layer also owns its kernel's parameters: a per-head log-decay
    (`decay=True`) and, for the `hedgehog` feature map, a per-head projection.
    """

    def __init__(self, config: ModelConfig, kernel: str, *, rngs: nnx.Rngs):
        kernels.get(kernel)  # unknown names fail here, before anything is traced
        e, h, kh, d = config.embed, config.heads, config.kv_heads, config.head_dim
        self.config, self.kernel = config, kernel
        self.wq = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), fan_in=e)
        self.wk = param(rngs, (e, kh, d), ("embed", "kv_heads", "head_dim"), fan_in=e)
        self.wv = param(rngs, (e, kh, d), ("embed", "kv_heads", "head_dim"), fan_in=e)
        self.wo = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), fan_in=h * d)
        if kernel in kernels.LINEAR_KERNELS:
            lin = config.linear
            if lin.decay:
                # log_decay = -softplus(decay_logit) <= 0 whatever training does; per-head
                # decays start spread over 1 - 2^-5 .. 1 - 2^-9 (as retention does).
                log_rates = jnp.log1p(-(2.0 ** (-5.0 - 4.0 * jnp.arange(h) / max(h - 1, 1))))
                logit = jnp.log(jnp.expm1(-log_rates))  # softplus^-1(-log_rates)
                self.decay_logit = param(rngs, (h,), ("heads",), value=logit)
            if lin.feature_map == "hedgehog":
                # Hedgehog starts at the identity map (as its paper does).
                f = lin.hedgehog_dim or d
                eye = jnp.broadcast_to(jnp.eye(d, f), (h, d, f))
                self.hedgehog = param(rngs, (h, d, f), ("heads", "head_dim", None), value=eye)
                self.hedgehog_bias = param(rngs, (h, f), ("heads", None), value=jnp.zeros((h, f)))

    def kernel_params(self) -> dict:
        out = {}
        if hasattr(self, "decay_logit"):
            out["log_decay"] = -jax.nn.softplus(self.decay_logit[...])
        if hasattr(self, "hedgehog"):
            out["hedgehog"] = self.hedgehog[...]
            out["hedgehog_bias"] = self.hedgehog_bias[...]
        return out

    def qkv(self, x_BTE, positions_BT):
        """Projected and rotated q [B, T, H, D], k and v [B, T, K, D]."""
        dt, base = x_BTE.dtype, self.config.rope_base
        q = jnp.einsum("bte,ehd->bthd", x_BTE, self.wq[...].astype(dt))
        k = jnp.einsum("bte,ekd->btkd", x_BTE, self.wk[...].astype(dt))
        v = jnp.einsum("bte,ekd->btkd", x_BTE, self.wv[...].astype(dt))
        return rope(q, positions_BT, base), rope(k, positions_BT, base), v

    def __call__(self, x_BTE, positions_BT, mask_positions, segment_ids,
                 ctx: ShardingContext | None):
        q, k, v = self.qkv(x_BTE, positions_BT)
        q = constrain(q, ("batch", "length", "heads", "head_dim"), ctx)
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"), ctx)
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"), ctx)
        inputs = kernels.KernelInputs(positions=mask_positions, segment_ids=segment_ids,
                                      config=self.config, ctx=ctx, params=self.kernel_params())
        out_BTHD = kernels.get(self.kernel)(q, k, v, inputs)
        out_BTHD = constrain(out_BTHD, ("batch", "length", "heads", "head_dim"), ctx)
        return jnp.einsum("bthd,hde->bte", out_BTHD, self.wo[...].astype(x_BTE.dtype))
