"""Sparse and approximate causal attention: hash buckets, query/key dropping, HyperAttention."""

from lca.sparse.bucketed import bucketed_attention, dropped_attention, hash_buckets

__all__ = ["bucketed_attention", "dropped_attention", "hash_buckets"]
