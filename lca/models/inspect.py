"""Looking inside a model on one device: attention maps.

In natural token order (a contiguous layout on one device), which is what
`lca.load` gives by default. Generation is `lca.generate` (through the KV cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lca.models.transformer import Transformer


def attention_weights(model: Transformer, tokens_BT, layer: int):
    """Softmax attention probabilities of one layer, float32 [B, H, T, T] (causal).

    Recomputed densely from the layer's q and k (whatever kernel it names;
    for a `linear` layer these are the softmax weights it approximates).
    """
    tokens_BT = jnp.asarray(tokens_BT)
    b, t = tokens_BT.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = model.embed_tokens(tokens_BT)
    for block in model.blocks[:layer]:
        x = block(x, positions, None, None, None)
    block = model.blocks[layer]
    q, k, _ = block.attn.qkv(block.attn_norm(x), positions)
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = logits * q.shape[-1] ** -0.5
    causal = jnp.tril(jnp.ones((t, t), bool))
    return jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)

