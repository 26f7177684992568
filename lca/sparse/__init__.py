"""Sparse and approximate causal attention: hash buckets, query/key dropping, HyperAttention
(`lca.sparse.hyper`)."""

from lca.sparse.bucketed import (bucketed_attention, buckets_from, dropped_attention,
                                 hash_buckets, rotation_for)

__all__ = ["bucketed_attention", "buckets_from", "dropped_attention", "hash_buckets",
           "rotation_for"]
