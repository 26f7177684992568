"""Sparse and approximate causal attention: hash buckets, query/key dropping, HyperAttention
(`lca.sparse.hyper`)."""

from lca.sparse.bucketed import (bucketed_attention, buckets_from, dropped_attention,
                                 hash_buckets, rotation_for)
from lca.sparse.hyper import hyper_attention

__all__ = ["bucketed_attention", "buckets_from", "dropped_attention", "hash_buckets",
           "hyper_attention", "rotation_for"]
