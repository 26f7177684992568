"""Sequence-parallel causal linear attention on arrays already in layout order.

`lca.sequence_parallel_attention(..., impl="linear")` permutes tokens into the
layout, calls `attention_in_layout_linear` and permutes back; a model that
keeps its activations in layout order calls this directly.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from lca.kernels import linear as linear_lib
from lca.kernels.linear_parallel import ALGORITHMS, LAYOUTS, linear_attention_shard

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def _check(q, k, v, *, mesh, axis, layout, algorithm, log_decay, normalize, chunk_size,
           options):
    b, t, h, _, _ = linear_lib.check_linear_args(q, k, v, log_decay=log_decay,
                                                 normalize=normalize, chunk_size=chunk_size)
    if layout == "striped":
        raise ValueError("layout='striped' is not supported by linear attention: a striped"
                         " shard's tokens are not contiguous runs, so no state can be passed"
                         " between shards; use layout='contiguous' or 'zigzag'")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)} for linear attention;"
                         f" got {layout!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}; got {algorithm!r}")
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not a mesh axis; the mesh has {mesh.axis_names}")
    n = mesh.shape[axis]
    pieces = 2 * n if layout == "zigzag" else n
    if t % pieces:
        raise ValueError(f"seq length {t} must divide into {pieces} equal pieces for"
                         f" layout={layout!r} on {n} shards of axis {axis!r}")
    if algorithm == "doubling" and n & (n - 1):
        raise ValueError(f"algorithm='doubling' needs a power-of-two size of axis {axis!r};"
                         f" got {n}. Use 'allgather' or 'ring'.")
    batch_shards = 1
    for name in BATCH_AXES:
        batch_shards *= mesh.shape.get(name, 1)
    if b % batch_shards:
        raise ValueError(f"batch {b} must divide by the {batch_shards} shards of mesh axes"
                         f" {[a for a in BATCH_AXES if a in mesh.axis_names]}")
    if h % mesh.shape.get(HEAD_AXIS, 1):
        raise ValueError(f"heads {h} must divide by the {mesh.shape[HEAD_AXIS]} shards of"
                         f" mesh axis {HEAD_AXIS!r}")
    if options.pop("causal", True) is not True:
        raise ValueError("linear attention is causal only; got causal=False")
    if options:
        raise ValueError(f"linear attention does not take {sorted(options)}; it takes"
                         " log_decay, normalize, chunk_size and algorithm")


def attention_in_layout_linear(q, k, v, *, mesh, axis="sequence", layout="contiguous",
                               positions=None, algorithm="allgather", log_decay=None,
                               normalize=False, chunk_size=64, **options):
    """Causal linear attention with the sequence split over `axis` of `mesh`.

    Args:
      q, k: [B, T, H, K]; v: [B, T, H, V]; global arrays already in `layout`
        order (sharded or not). The batch is split over the mesh's `data` and
        `fsdp` axes and the heads over `tensor`, where the mesh has them.
      mesh, axis: the mesh and the axis that splits the sequence.
      layout: "contiguous" or "zigzag"; "striped" raises a ValueError.
      positions: accepted and unused (callers pass softmax kernels' arguments).
      algorithm: "allgather" (one all-gather of states, LASP-2), "ring"
        (n - 1 ppermute hops, LASP) or "doubling" (log2(n) ppermute rounds).
      log_decay: None, [H], or [B, T, H] in layout order; <= 0.
      normalize, chunk_size: as in `lca.linear_attention`.
      **options: `causal=True` is accepted; anything else raises.

    Returns:
      [B, T, H, V] in q's dtype, in layout order, sharded like q.
    """
    del positions
    _check(q, k, v, mesh=mesh, axis=axis, layout=layout, algorithm=algorithm,
           log_decay=log_decay, normalize=normalize, chunk_size=chunk_size,
           options=dict(options))
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
    heads = HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None
    tokens = P(batch, axis, heads, None)
    if log_decay is None:
        decay_spec = None
    elif log_decay.ndim == 1:
        decay_spec = P(heads)
    else:
        decay_spec = P(batch, axis, heads)

    def shard(q, k, v, log_decay):
        return linear_attention_shard(q, k, v, axis_name=axis, algorithm=algorithm,
                                      layout=layout, log_decay=log_decay,
                                      normalize=normalize, chunk_size=chunk_size)

    return jax.shard_map(shard, mesh=mesh, in_specs=(tokens, tokens, tokens, decay_spec),
                         out_specs=tokens)(q, k, v, log_decay)
