"""Sparse kernels in a model layer: the sparsity decided from the layer's own q and k.

Dimension legend: B batch, T length, H heads, K kv heads (G = H / K), D head_dim,
R random projections per LSH.

  hash_sparse  q and k hashed by one fixed angular LSH per kv head (its G
               query heads use the kv head's), `lca.sparse.bucketed_attention`:
               a query sees earlier keys of its bucket, as the paper's
               Hash-sparse attention.
  qk_drop      a token's query (key) is kept when an angular LSH of it, with
               round(1 / keep) buckets, puts it in bucket 0: a decision from that
               token alone, so causal (no later token changes it), keeping about
               `keep` of each. `lca.sparse.dropped_attention` with capacity
               min(T, ceil(capacity_factor * keep * T)) per head; kept tokens past
               it are dropped (also causal).
  hyper        `lca.sparse.hyper_attention` (approximate) with a fixed key per
               layer; `block`, `sample_size`, `min_seq_len` from the config.

The projections are fixed at initialisation (`Fixed`, not `nnx.Param`: saved in
checkpoints, never trained). Sparse layers run on one sequence shard, inside
`jax.shard_map` over the batch and head axes the activation rules give (so
each device sorts only its own rows and heads), and have no KV-cache path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import PartitionSpec as P

from lca import sparse as sparse_lib
from lca.models.config import ModelConfig
from lca.parallel.sequence import KV_TOKENS, TOKENS
from lca.parallel.sharding import activation_spec


class Fixed(nnx.Variable):
    """A fixed random array of a layer: in the state and checkpoints, not optimised."""


def _fixed(rngs, shape, logical):
    value = jax.random.normal(rngs.params(), shape, jnp.float32)
    return Fixed(value, out_sharding=tuple(logical), eager_sharding=False)


def _drop_buckets(keep: float) -> int:
    return max(1, round(1 / keep))


class SparseParams(nnx.Module):
    """The layer's fixed projections (and HyperAttention's sampling seed)."""

    def __init__(self, config: ModelConfig, name: str, rngs: nnx.Rngs):
        kh, d, opts = config.kv_heads, config.head_dim, config.sparse
        if name == "hyper":  # its own sortLSH and samples, from one key
            seed = jax.random.randint(rngs.params(), (), 0, 2 ** 24).astype(jnp.float32)
            self.seed = Fixed(seed, out_sharding=(), eager_sharding=False)  # float: exact ints
            return
        buckets = opts.num_buckets if name == "hash_sparse" else _drop_buckets(opts.keep)
        shape = (kh, d, -(-buckets // 2))
        self.k_rotation = _fixed(rngs, shape, ("kv_heads", "head_dim", None))
        if name == "qk_drop":  # queries dropped by their own projection
            self.q_rotation = _fixed(rngs, shape, ("kv_heads", "head_dim", None))


def _per_query_head(rotation, heads):
    return jnp.repeat(rotation, heads // rotation.shape[0], axis=0)


class SparseAdapter:
    """The adapter of a `registry.SparseKernel` (see `lca.models.kernels`)."""

    def __init__(self, name: str):
        self.name = name

    def params(self, config, rngs):
        return SparseParams(config, self.name, rngs)

    def prefill(self, *args):
        raise ValueError(f"attention kernel {self.name!r} has no KV-cache path: generate with"
                         " a model of softmax or linear layers")

    decode = prefill

    def __call__(self, q, k, v, call, ctx, positions, segment_ids, params: SparseParams):
        fixed = {name: getattr(params, name)[...] for name in ("k_rotation", "q_rotation", "seed")
                 if hasattr(params, name)}
        if ctx is None or ctx.mesh is None:
            return self._local(q, k, v, call, positions, segment_ids, fixed)
        if ctx.total_sequence_shards > 1:
            raise ValueError(f"attention kernel {self.name!r} runs on one sequence shard; this"
                             f" mesh shards the sequence over {ctx.sequence_axes} (put those"
                             " devices on config.mesh.data or tensor)")
        return self._sharded(q, k, v, call, ctx, positions, segment_ids, fixed)

    def _sharded(self, q, k, v, call, ctx, positions, segment_ids, fixed):
        """Inside `shard_map`: each device its own batch rows and heads, as the rules place
        them (the sequence whole)."""
        rules, mesh = ctx.activation_rules, ctx.mesh
        q_spec = activation_spec(TOKENS, rules, mesh, q.shape)
        k_spec = activation_spec(KV_TOKENS, rules, mesh, k.shape)
        if q_spec[2] != k_spec[2]:
            q_spec, k_spec = P(q_spec[0]), P(k_spec[0])  # heads whole where kv heads cannot split
        ids = P(q_spec[0])
        specs = {"k_rotation": P(k_spec[2]), "q_rotation": P(k_spec[2]), "seed": P()}
        args = [q, k, v, positions, segment_ids, fixed]
        in_specs = (q_spec, k_spec, k_spec, None if positions is None else ids,
                    None if segment_ids is None else ids, {n: specs[n] for n in fixed})

        def local(q, k, v, positions, segment_ids, fixed):
            return self._local(q, k, v, call, positions, segment_ids, fixed)

        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec)(*args)

    def _local(self, q, k, v, call, positions, segment_ids, fixed):
        opts, h = call.sparse, q.shape[2]
        common = dict(causal=True, segment_ids=segment_ids, positions=positions,
                      **call.tiles())
        if self.name == "hash_sparse":
            rot = fixed["k_rotation"]
            qb = sparse_lib.buckets_from(q, _per_query_head(rot, h), opts.num_buckets)
            kb = sparse_lib.buckets_from(k, rot, opts.num_buckets)
            return sparse_lib.bucketed_attention(q, k, v, qb, kb, num_buckets=opts.num_buckets,
                                                 **common)
        if self.name == "qk_drop":
            n = _drop_buckets(opts.keep)
            q_keep = sparse_lib.buckets_from(
                q, _per_query_head(fixed["q_rotation"], h), n) == 0
            k_keep = sparse_lib.buckets_from(k, fixed["k_rotation"], n) == 0
            t = q.shape[1]
            capacity = min(t, max(1, math.ceil(opts.capacity_factor * opts.keep * t)))
            return sparse_lib.dropped_attention(q, k, v, q_keep, k_keep, capacity=capacity,
                                                overflow="drop", **common)
        if segment_ids is not None:
            raise ValueError("attention kernel 'hyper' does not take segment ids (packed"
                             " documents); use hash_sparse or qk_drop for packed text")
        # Causal by index: on one sequence shard the tokens are in natural order. A
        # sequence shorter than the configured block or sample takes its length (exact).
        t = q.shape[1]
        return sparse_lib.hyper_attention(q, k, v, causal=True, block=min(opts.block, t),
                                          sample_size=min(opts.sample_size, t),
                                          key=jax.random.key(fixed["seed"].astype(jnp.int32)),
                                          min_seq_len=opts.min_seq_len or None)
