"""Meshes, sharding rules and shard_map helpers."""

from lca.parallel.mesh import make_mesh
from lca.parallel.sequence import attention_in_layout, sequence_parallel_attention

__all__ = ["make_mesh", "attention_in_layout", "sequence_parallel_attention"]
