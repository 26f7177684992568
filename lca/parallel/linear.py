"""Sequence-parallel causal linear attention on arrays already in layout order.

`lca.sequence_parallel_attention(..., impl="linear")` permutes tokens into the
layout, calls `attention_in_layout_linear` and permutes back; a model that
keeps its activations in layout order calls this directly.

With the sequence sharded over two axes, axis=(all-to-all axis, ring axis)
as for `usp`, each device first gathers its ring shard's tokens for H / n
heads by one all-to-all over the first (`lca.kernels.ulysses`), the states
then cross the ring axis as over one axis, and one all-to-all gives the
output back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from lca.kernels import linear as linear_lib
from lca.kernels import ulysses
from lca.kernels.linear_parallel import ALGORITHMS, LAYOUTS, linear_attention_shard
from lca.parallel.sequence import check_length, sequence_axes, specs


def _check(q, k, v, *, mesh, axis, layout, algorithm, log_decay, normalize, chunk_size,
           segment_ids, options):
    linear_lib.check_linear_args(q, k, v, log_decay=log_decay, normalize=normalize,
                                 chunk_size=chunk_size, segment_ids=segment_ids)
    t = q.shape[1]
    if layout == "striped":
        raise ValueError("layout='striped' is not supported by linear attention: a striped"
                         " shard's tokens are not contiguous runs, so no state can be passed"
                         " between shards; use layout='contiguous' or 'zigzag'")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)} for linear attention;"
                         f" got {layout!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}; got {algorithm!r}")
    if isinstance(axis, str) and axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not a mesh axis; the mesh has {mesh.axis_names}")
    _, n, total = sequence_axes(mesh, axis)
    pieces = 2 * n if layout == "zigzag" else n
    if t % pieces:
        raise ValueError(f"seq length {t} must divide into {pieces} equal pieces for"
                         f" layout={layout!r} on {n} shards of axis {axis!r}")
    check_length(t, layout, n, total)
    if not isinstance(axis, str):
        ulysses.check_heads(q.shape[2], k.shape[2], mesh.shape[axis[0]], f"axis {axis[0]!r}")
    if algorithm == "doubling" and n & (n - 1):
        raise ValueError(f"algorithm='doubling' needs a power-of-two size of axis {axis!r};"
                         f" got {n}. Use 'allgather' or 'ring'.")
    if options.pop("causal", True) is not True:
        raise ValueError("linear attention is causal only; got causal=False")
    if options:
        raise ValueError(f"linear attention does not take {sorted(options)}; it takes"
                         " log_decay, normalize, chunk_size, segment_ids and algorithm")


def attention_in_layout_linear(q, k, v, *, mesh, axis="sequence", layout="contiguous",
                               positions=None, algorithm="allgather", log_decay=None,
                               normalize=False, chunk_size=64, rules=None, return_state=False,
                               segment_ids=None, **options):
    """Causal linear attention with the sequence split over `axis` of `mesh`.

    Args:
      q: [B, T, H, K], k: [B, T, J, K], v: [B, T, J, V], H % J == 0 (grouped
        query heads, never repeated); global arrays already in `layout` order
        (sharded or not). Batch and heads are split as the activation rules
        say (`rules`, default `lca.parallel.sharding.DEFAULT_ACTIVATION_RULES`:
        batch over data and fsdp, heads over tensor), as for softmax attention.
      mesh, axis: the mesh and the axis that splits the sequence.
      layout: "contiguous" or "zigzag"; "striped" raises a ValueError.
      positions: accepted and unused (callers pass softmax kernels' arguments).
      algorithm: "allgather" (one all-gather of states, LASP-2), "ring"
        (n - 1 ppermute hops, LASP) or "doubling" (log2(n) ppermute rounds).
      log_decay: None, [H], or [B, T, H] in layout order; <= 0.
      normalize, chunk_size: as in `lca.linear_attention`.
      segment_ids: int [B, T] document ids in layout order: the state restarts
        where the id changes in global order (packed documents); None: one.
      return_state: also return the state after the last token, [B, H, K, V]
        ([B, H, K, V + 1] with normalize) float32, heads placed as q's,
        replicated over the sequence axes (what a decoding cache holds).
      **options: `causal=True` is accepted; anything else raises.

    Returns:
      [B, T, H, V] in q's dtype, in layout order, sharded like q (and with
      return_state the final state).
    """
    del positions
    _check(q, k, v, mesh=mesh, axis=axis, layout=layout, algorithm=algorithm,
           log_decay=log_decay, normalize=normalize, chunk_size=chunk_size,
           segment_ids=segment_ids, options=dict(options))
    seq_spec, _, _ = sequence_axes(mesh, axis)
    q_spec, k_spec, _ = specs(mesh, seq_spec, rules, q.shape, k.shape)
    out_spec = P(*q_spec[:3], None)
    if log_decay is None:
        decay_spec = None
    elif log_decay.ndim == 1:
        decay_spec = P(q_spec[2])
    else:
        decay_spec = P(*q_spec[:3])

    seg_spec = None if segment_ids is None else P(*q_spec[:2])

    def shard(q, k, v, log_decay, segment_ids):
        ring, a2a = (axis, None) if isinstance(axis, str) else (axis[1], axis[0])
        if a2a is not None:  # every token of the ring shard, for this device's heads
            q, k, v = (ulysses.gather_tokens(q, a2a), ulysses.gather_kv_tokens(k, a2a),
                       ulysses.gather_kv_tokens(v, a2a))
            log_decay = _decay_heads(log_decay, a2a)
            if segment_ids is not None:
                segment_ids = lax.all_gather(segment_ids, a2a, axis=1, tiled=True)
        out = linear_attention_shard(q, k, v, axis_name=ring, algorithm=algorithm,
                                     layout=layout, log_decay=log_decay, normalize=normalize,
                                     chunk_size=chunk_size, return_state=return_state,
                                     segment_ids=segment_ids)
        out, state = out if return_state else (out, None)
        out = out if a2a is None else ulysses.scatter_tokens(out, a2a)
        if not return_state:
            return out
        if a2a is not None:  # this device's H / n heads -> all the heads its ring shard had
            h = state.shape[1]
            whole = jnp.zeros((state.shape[0], h * lax.axis_size(a2a)) + state.shape[2:],
                              state.dtype)
            whole = lax.dynamic_update_slice_in_dim(whole, state, lax.axis_index(a2a) * h, 1)
            state = lax.psum(whole, a2a)  # a gather that types as replicated over a2a
        return out, state

    out_specs = (out_spec, P(q_spec[0], q_spec[2])) if return_state else out_spec
    return jax.shard_map(shard, mesh=mesh,
                         in_specs=(q_spec, k_spec, k_spec, decay_spec, seg_spec),
                         out_specs=out_specs)(q, k, v, log_decay, segment_ids)


def _decay_heads(log_decay, axis_name):
    """This device's heads of a [H] decay, or its ring shard's tokens of a [B, T, H] one."""
    if log_decay is None:
        return None
    if log_decay.ndim == 3:
        return ulysses.gather_tokens(log_decay[..., None], axis_name)[..., 0]
    per_device = log_decay.shape[0] // lax.axis_size(axis_name)
    return lax.dynamic_slice_in_dim(log_decay, lax.axis_index(axis_name) * per_device,
                                    per_device)
