"""Inputs and the float64 comparison shared by the sequence-parallel attention tests."""

from __future__ import annotations

import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
from attention_cases import (assert_matches_reference, compiled_outputs_and_grads, make_inputs,
                             outputs_and_grads, random_segments, reference_outputs_and_grads)

import lca
from lca.parallel import make_mesh

LAYOUTS = ("contiguous", "striped", "zigzag")
MASKS = ("bidirectional", "causal", "window", "causal_segments")
HEADS = {"mha": 4, "gqa": 2}  # kv_heads for 4 query heads
SEQ_LEN = 64
BLOCKS = {"block_q": 4, "block_k": 4}  # several tiles per zigzag chunk even at n = 8


def interpret_cases():
    """(strategy, layout, mask, kv_heads of 2 query heads) for a kernel run in Pallas
    interpret mode, where every case compiles its own kernels: a covering set (the ring
    meets every layout x mask once, head groupings alternating; the all-gather every mask
    once, layouts rotating), or with LCA_INTERPRET_FULL=1 the whole product."""
    if os.environ.get("LCA_INTERPRET_FULL"):
        return list(itertools.product(("ring", "allgather"), LAYOUTS, MASKS, (2, 1)))
    ring = [("ring", lay, m, (2, 1)[i % 2])
            for i, (lay, m) in enumerate(itertools.product(LAYOUTS, MASKS))]
    return ring + [("allgather", LAYOUTS[i % 3], m, (1, 2)[i % 2]) for i, m in enumerate(MASKS)]


def sub_mesh(n, axis="sequence"):
    """A 1-D mesh of the first n devices: in-process, far cheaper than a subprocess."""
    return make_mesh({axis: n}, devices=jax.devices()[:n])


def strategy_case(name):
    """(mesh, options, heads, kv_heads) on which strategy `name` runs over 8 devices: a
    two-axis one on (ulysses 2, sequence 4), one that splits heads with 8 heads."""
    from lca.kernels import registry

    entry = registry.get(name)
    if entry.axes == 2:
        return (make_mesh({"ulysses": 2, "sequence": 4}), {"axis": ("ulysses", "sequence")},
                8, 2)
    return sub_mesh(8), {}, (4 if entry.check is None else 8), 2


def mask_kwargs(name, seed, batch, seq_len):
    """Self-attention masks; packed documents cross shard boundaries in every layout."""
    if name == "bidirectional":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "window":
        return {"causal": True, "window": 19}  # several shards wide at n >= 4, not all
    if name == "causal_segments":
        rng = np.random.default_rng(seed + 1000)
        return {"causal": True, "segment_ids": random_segments(rng, batch, seq_len, 5)}
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def _case(seed, dtype, seq_len, batch, heads, kv_heads, mask, head_dim=8):
    """Inputs, mask arguments and float64 reference of one case: shared by every
    strategy, local kernel, layout and mesh that computes it."""
    q, k, v, ct = make_inputs(seed, batch=batch, q_len=seq_len, kv_len=seq_len, heads=heads,
                              kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    kwargs = mask_kwargs(mask, seed, batch, seq_len)
    return (q, k, v, ct), kwargs, reference_outputs_and_grads(q, k, v, ct, **kwargs)


def check_against_reference(mesh, layout, mask, kv_heads, *, impl="ring", seed=0,
                            dtype=jnp.float32, seq_len=SEQ_LEN, fast_compile=False, batch=2,
                            heads=4, head_dim=8, **options):
    """Natural-order output and q/k/v gradients equal the float64 reference."""
    (q, k, v, ct), kwargs, ref = _case(seed, dtype, seq_len, batch, heads, kv_heads, mask,
                                       head_dim)
    fn = functools.partial(lca.sequence_parallel_attention, mesh=mesh, impl=impl, layout=layout,
                           **kwargs, **{**BLOCKS, **options})
    if fast_compile:  # many mesh x layout x mask cases: see attention_cases.FAST_COMPILE
        got = compiled_outputs_and_grads(fn, q, k, v, ct)
    else:
        got = outputs_and_grads(jax.jit(fn), q, k, v, ct)
    assert got[0].dtype == dtype and got[0].shape == q.shape
    what = (f"{impl}/{options.get('local', 'blockwise')}/{layout}/{mask}/kv_heads={kv_heads}"
            f"/mesh={dict(mesh.shape)}")
    assert_matches_reference(got, ref, dtype, what)
