"""Meshes, sharding rules and shard_map helpers."""

from lca.parallel.mesh import make_mesh

__all__ = ["make_mesh"]
