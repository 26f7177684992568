"""Decoder-only transformer: embedding, pre-norm blocks (attention + SwiGLU), output head.

Dimension legend: B batch, T length (layout order), E embed, V vocab.

The model works in whatever token layout its inputs are in: positions travel
with the tokens and drive RoPE and the causal mask, so a batch permuted once
at the input (see `lca.data.to_layout`) needs nothing else. Logits come back
in that same order; the loss is computed there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lca.models import cache as cache_lib
from lca.models.attention import Attention
from lca.models.config import ModelConfig
from lca.models.layers import RMSNorm, SwiGLU, param
from lca.parallel.sharding import ShardingContext, constrain

F32 = jnp.float32
ACT = ("batch", "length", "embed")


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, kernel: str, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.embed, eps=config.norm_eps, rngs=rngs)
        self.attn = Attention(config, kernel, rngs=rngs)
        self.mlp_norm = RMSNorm(config.embed, eps=config.norm_eps, rngs=rngs)
        self.mlp = SwiGLU(config.embed, config.mlp, rngs=rngs)

    def __call__(self, x_BTE, positions_BT, mask_positions, segment_ids, ctx):
        return self._mlp(x_BTE, self.attn(self.attn_norm(x_BTE), positions_BT, mask_positions,
                                          segment_ids, ctx), ctx)

    def prefill(self, x_BTE, positions_BT, mask_positions, ctx):
        h, entry = self.attn.prefill(self.attn_norm(x_BTE), positions_BT, mask_positions, ctx)
        return self._mlp(x_BTE, h, ctx), entry

    def decode(self, x_B1E, entry, view, ctx):
        h, entry = self.attn.decode(self.attn_norm(x_B1E), entry, view, ctx)
        return self._mlp(x_B1E, h, ctx), entry

    def _mlp(self, x_BTE, attended_BTE, ctx):
        x_BTE = constrain(x_BTE + attended_BTE, ACT, ctx)
        x_BTE = x_BTE + self.mlp(self.mlp_norm(x_BTE), ctx)
        return constrain(x_BTE, ACT, ctx)


class Transformer(nnx.Module):
    """`model(tokens, positions=None, segment_ids=None, ctx=None)` -> float32 logits [B, T, V].

    tokens, positions, segment_ids: int [B, T], all in the model's layout order.
    positions may be None (then 0..T-1) for the contiguous layout or on one sequence shard.
    ctx: a `ShardingContext` (mesh and activation rules), or None on one device.

    Inference (`lca.models.cache`): `prefill(tokens, capacity=C, ctx=ctx)` ->
    (last-token logits [B, V], Cache); `decode(cache, tokens_B, ctx=ctx)` ->
    (next-token logits [B, V], Cache). `lca.generate` drives both.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        e, v = config.embed, config.vocab_size
        self.embed = param(rngs, (v, e), ("vocab", "embed"), std=1.0)
        self.blocks = nnx.List(
            [Block(config, kernel, rngs=rngs) for kernel in config.layer_kernels()])
        self.final_norm = RMSNorm(e, eps=config.norm_eps, rngs=rngs)
        if not config.tied_embeddings:
            self.head = param(rngs, (e, v), ("embed", "vocab"), fan_in=e)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None,
                 ctx: ShardingContext | None = None):
        return self.from_embeddings(self.embed_tokens(tokens_BT), positions_BT, segment_ids_BT,
                                    ctx)

    def embed_tokens(self, tokens_BT):
        """[B, T] int -> [B, T, E] in the activation dtype."""
        return jnp.take(self.embed[...], tokens_BT, axis=0).astype(jnp.dtype(self.config.dtype))

    def from_embeddings(self, x_BTE, positions_BT=None, segment_ids_BT=None,
                        ctx: ShardingContext | None = None):
        """The model after its embedding lookup (a causality test differentiates here)."""
        cfg = self.config
        if positions_BT is None:
            # With one sequence shard every layout is the natural order.
            if cfg.layout != "contiguous" and ctx is not None and ctx.sequence_shards > 1:
                raise ValueError(
                    f"layout={cfg.layout!r} over {ctx.sequence_shards} sequence shards: pass"
                    " positions in layout order (lca.data.to_layout gives them)")
            mask_positions = None
            positions_BT = jnp.broadcast_to(jnp.arange(x_BTE.shape[1]), x_BTE.shape[:2])
        else:
            mask_positions = positions_BT
        x_BTE = constrain(x_BTE, ACT, ctx)
        for block in self.blocks:
            if cfg.remat:
                graphdef, state = nnx.split(block)

                def run(state, x, graphdef=graphdef):
                    return nnx.merge(graphdef, state)(x, positions_BT, mask_positions,
                                                      segment_ids_BT, ctx)
                x_BTE = jax.checkpoint(run)(state, x_BTE)
            else:
                x_BTE = block(x_BTE, positions_BT, mask_positions, segment_ids_BT, ctx)
        return self.logits(x_BTE, ctx)

    def logits(self, x_BTE, ctx: ShardingContext | None = None):
        """Final norm and output head: [B, T, E] -> float32 logits [B, T, V]."""
        x_BTE = self.final_norm(x_BTE)
        w_EV = self.embed[...].T if self.config.tied_embeddings else self.head[...]
        logits_BTV = jnp.einsum("bte,ev->btv", x_BTE.astype(F32), w_EV)
        return constrain(logits_BTV, ("batch", "length", "vocab"), ctx)

    def prefill(self, tokens_BT, *, capacity: int, ctx: ShardingContext | None = None):
        """(float32 logits of the last prompt token [B, V], a Cache of `capacity` slots);
        tokens in natural order. See `lca.models.cache.prefill`."""
        return cache_lib.prefill(self, tokens_BT, capacity, ctx)

    def decode(self, cache, tokens_B, ctx: ShardingContext | None = None, *,
               gather_cache: bool = False):
        """(float32 logits [B, V] of the token after `tokens_B`, the cache with them
        appended). See `lca.models.cache.decode`."""
        return cache_lib.decode(self, cache, tokens_B, ctx, gather_cache=gather_cache)


def cross_entropy(logits_BTV, targets_BT, weights_BT):
    """(sum of weighted token losses, sum of weights, number of correct argmax predictions)."""
    logp = jax.nn.log_softmax(logits_BTV.astype(F32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
    w = weights_BT.astype(F32)
    correct = (jnp.argmax(logits_BTV, -1) == targets_BT).astype(F32) * w
    return jnp.sum(nll_BT * w), jnp.sum(w), jnp.sum(correct)
