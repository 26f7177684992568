"""Frozen model configuration: what `lca.train` builds from an ml_collections config."""

from __future__ import annotations

import dataclasses

from lca.kernels import registry

LAYOUTS = ("contiguous", "striped", "zigzag")
FEATURE_MAPS = ("elu1", "relu", "taylor2", "hedgehog", "identity")


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    """Options of a `linear` attention layer."""

    feature_map: str = "elu1"
    decay: bool = True            # a learned per-head log-decay
    normalize: bool = False
    chunk_size: int = 64
    hedgehog_dim: int = 0         # hedgehog: E (2E features); 0 means head_dim


@dataclasses.dataclass(frozen=True)
class SparseOptions:
    """Options of the sparse kernels (`lca.models.sparse`): hash_sparse, qk_drop, hyper."""

    num_buckets: int = 4          # hash_sparse: LSH buckets per head
    keep: float = 0.5             # qk_drop: the fraction of queries and of keys kept
    capacity_factor: float = 1.25  # qk_drop: slots per head = factor * keep * length
    block: int = 64               # hyper: block-diagonal block of the sorted order
    sample_size: int = 64         # hyper: sampled key columns
    min_seq_len: int = 0          # hyper: exact below this length; 0: its default


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer.

    `attention` lists each layer's kernel by its `lca.kernels.registry` name
    (a local kernel, a strategy or the linear family); a shorter list is
    cycled over the layers, so ("linear", "linear", "linear", "ring") with
    `layers=8` is two hybrid groups. `local` is the local kernel every
    strategy layer runs on its shard. `layout` is the token layout of the
    whole model (the permutation happens once, at the input). block_q /
    block_k 0: the local kernel's default tiles (the registry's).
    """

    vocab_size: int = 256
    embed: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    mlp: int = 256
    attention: tuple[str, ...] = (registry.DEFAULT_LOCAL,)
    local: str = registry.DEFAULT_LOCAL  # the local kernel strategies run
    layout: str = "contiguous"
    window: int = 0               # causal sliding window in tokens; 0 = none
    block_q: int = 0              # tile lengths; 0 = the local kernel's default
    block_k: int = 0
    linear: LinearOptions = LinearOptions()
    sparse: SparseOptions = SparseOptions()
    tied_embeddings: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    remat: bool = False
    dtype: str = "float32"        # activation dtype; parameters are float32

    def layer_kernels(self) -> tuple[str, ...]:
        return tuple(self.attention[i % len(self.attention)] for i in range(self.layers))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
