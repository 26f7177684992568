"""The layer -> kernel registry: attention layers name a kernel, this file calls it.

An adapter takes q [B, T, H, D], k and v [B, T, K, D] in the model's layout
order, a `KernelInputs` (positions and segment ids in that order, the model
config, the sharding context, and any parameters the kernel needs, such as a
linear layer's decay or feature-map weights) and returns [B, T, H, D].

A new kernel plugs in by adding one adapter here (or calling `register`);
the model never changes. Kernels that need the mesh's sequence axis (`ring`,
`allgather`, `linear` across shards) run through
`lca.parallel.sequence.attention_in_layout`, which expects arrays already in
layout order: the model permuted once, at its input.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from lca.attention import attention as single_device_attention
from lca.kernels import feature_maps
from lca.kernels.linear import linear_attention
from lca.models.config import ModelConfig
from lca.parallel.sequence import attention_in_layout
from lca.parallel.sharding import ShardingContext


@dataclasses.dataclass(frozen=True)
class KernelInputs:
    positions: Any                 # int [B, T] in layout order, or None (arange, contiguous)
    segment_ids: Any               # int [B, T] in layout order, or None
    config: ModelConfig
    ctx: ShardingContext | None
    params: dict = dataclasses.field(default_factory=dict)

    @property
    def window(self):
        return self.config.window or None


def _local(impl):
    def adapter(q, k, v, inputs: KernelInputs):
        options = {}
        if impl == "blockwise":
            options = dict(block_q=inputs.config.block_q, block_k=inputs.config.block_k)
        return single_device_attention(q, k, v, impl=impl, causal=True, window=inputs.window,
                             segment_ids=inputs.segment_ids, positions=inputs.positions,
                             kv_positions=inputs.positions, **options)
    return adapter


def _sequence_parallel(impl):
    """Kernels that run per shard of the sequence axis; blockwise when there is one shard."""

    def adapter(q, k, v, inputs: KernelInputs):
        ctx = inputs.ctx
        if ctx is None or ctx.sequence_shards == 1:
            return _local("blockwise")(q, k, v, inputs)
        return attention_in_layout(
            q, k, v, mesh=ctx.mesh, axis=ctx.sequence_axis, impl=impl,
            layout=inputs.config.layout, causal=True, window=inputs.window,
            positions=inputs.positions, segment_ids=inputs.segment_ids,
            block_q=inputs.config.block_q, block_k=inputs.config.block_k)
    return adapter


def feature_map(name: str, x_BTHD, params: dict):
    """Applies the named feature map of `lca.kernels` (hedgehog takes its layer's weights)."""
    if name == "identity":
        return x_BTHD
    fn = getattr(feature_maps, name, None)
    if fn is None:
        raise ValueError(f"config.model.linear.feature_map {name!r} is not in"
                         " lca.kernels.feature_maps")
    if name == "hedgehog":
        return fn(x_BTHD, params["hedgehog"], params["hedgehog_bias"])
    return fn(x_BTHD)


def _linear(q, k, v, inputs: KernelInputs):
    """Causal linear attention: feature map, per-head decay, state passed across shards."""
    lin, ctx, params = inputs.config.linear, inputs.ctx, inputs.params
    if inputs.segment_ids is not None:
        raise ValueError("kernel 'linear' does not take segment ids (packed documents);"
                         " use a softmax kernel for config.data.task='text'")
    groups = q.shape[2] // k.shape[2]
    # The linear kernel takes one K/V head per query head.
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    q = feature_map(lin.feature_map, q, params)
    k = feature_map(lin.feature_map, k, params)
    options = dict(log_decay=params.get("log_decay"), normalize=lin.normalize,
                   chunk_size=lin.chunk_size)
    if ctx is None or ctx.sequence_shards == 1:
        return linear_attention(q, k, v, **options)
    return attention_in_layout(
        q, k, v, mesh=ctx.mesh, axis=ctx.sequence_axis, impl="linear",
        layout=inputs.config.layout, causal=True, positions=inputs.positions, **options)


KERNELS: dict[str, Callable] = {
    "xla": _local("xla"),
    "blockwise": _local("blockwise"),
    "ring": _sequence_parallel("ring"),
    "allgather": _sequence_parallel("allgather"),
    "linear": _linear,
}

# Kernels whose layer owns parameters for them (decay, feature-map weights).
LINEAR_KERNELS = ("linear",)


def register(name: str, adapter: Callable) -> None:
    """Adds a kernel to the registry; a model config can then name it."""
    KERNELS[name] = adapter


def get(name: str) -> Callable:
    if name not in KERNELS:
        raise ValueError(
            f"unknown attention kernel {name!r} in config.model.attention;"
            f" known: {sorted(KERNELS)}")
    return KERNELS[name]
