"""Strategies over local kernels against the float64 reference: every layout, mask, grouping.

On the (8,) mesh, the full product of every one-axis strategy and every local
kernel that runs under one (as the registry lists them) x layout x mask x head
grouping (tests/test_ulysses.py: the all-to-all ones). The ring over blockwise, the default, also on a ring of 4, the
(2, 4) mesh, and all pairs on rings of 1 and 2.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import (TOLERANCE, make_inputs, outputs_and_grads, random_segments,
                             reference_outputs_and_grads, relative_error)
from jax.sharding import PartitionSpec as P
from ring_cases import HEADS, LAYOUTS, MASKS, check_against_reference, sub_mesh

import lca
from lca import layouts
from lca.kernels import masks as masks_lib
from lca.kernels import registry
from lca.kernels.ring import ring_attention, shard_pair_kind

# The one-axis strategies without head constraints; tests/test_ulysses.py has the others.
STRATEGIES = [s.name for s in registry.entries("strategy") if s.axes == 1 and s.check is None]
SHARDING_LOCALS = [e.name for e in registry.entries("local") if e.shards and e.platform is None]


@pytest.fixture(scope="module")
def mesh4():
    return sub_mesh(4)


@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_mask_and_head_grouping_on_a_ring_of_4(mesh4, layout, mask, heads):
    check_against_reference(mesh4, layout, mask, HEADS[heads], fast_compile=True)


# Bidirectional only for the default pair: the others' causal masks cover its paths.
PRODUCT_8 = [(impl, local, layout, mask, heads) for impl in STRATEGIES
             for local in SHARDING_LOCALS for layout in LAYOUTS for mask in MASKS
             for heads in sorted(HEADS) if mask != "bidirectional"
             or (impl, local) == (registry.DEFAULT_STRATEGY, registry.DEFAULT_LOCAL)]


@pytest.mark.parametrize("impl,local,layout,mask,heads", PRODUCT_8)
def test_every_strategy_over_every_local_kernel_on_the_8_mesh(mesh8, impl, local, layout, mask,
                                                              heads):
    check_against_reference(mesh8, layout, mask, HEADS[heads], impl=impl, local=local,
                            fast_compile=True)


@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_mask_and_head_grouping_on_a_data_by_sequence_mesh(mesh2x4, layout, mask,
                                                                        heads):
    check_against_reference(mesh2x4, layout, mask, HEADS[heads], fast_compile=True)


# Rings of 1 and 2: every layout, mask and head grouping appears, and every
# pair of them (an all-pairs design: 12 cases per ring instead of 24).
PAIRS = [("contiguous", "bidirectional", "mha"), ("contiguous", "causal_segments", "gqa"),
         ("striped", "causal", "gqa"), ("striped", "window", "mha"),
         ("zigzag", "window", "gqa"), ("zigzag", "causal_segments", "mha"),
         ("striped", "bidirectional", "gqa"), ("zigzag", "causal", "mha"),
         ("contiguous", "window", "mha"), ("contiguous", "causal", "gqa"),
         ("zigzag", "bidirectional", "gqa"), ("striped", "causal_segments", "mha")]


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("layout,mask,heads", PAIRS)
def test_small_rings(n, layout, mask, heads):
    check_against_reference(sub_mesh(n), layout, mask, HEADS[heads], fast_compile=True)


def test_heads_sharded_on_tensor_axis(mesh2x2x2):
    check_against_reference(mesh2x2x2, "zigzag", "causal_segments", HEADS["gqa"])


def test_striped_with_wider_stripes(mesh4):
    check_against_reference(mesh4, "striped", "causal_segments", HEADS["gqa"], stripe=2)


def test_blocks_larger_than_a_shard(mesh4):
    check_against_reference(mesh4, "zigzag", "window", HEADS["gqa"], block_q=512, block_k=512)


def test_bfloat16_error_does_not_grow_with_the_ring():
    """float32 merging: the error at n = 8 is at most 2x the error at n = 1."""
    q, k, v, ct = make_inputs(11, batch=2, q_len=128, kv_len=128, heads=4, kv_heads=2,
                              head_dim=16, dtype=jnp.bfloat16)
    kwargs = {"causal": True}
    ref = reference_outputs_and_grads(q, k, v, ct, **kwargs)

    def errors(n):
        fn = functools.partial(lca.sequence_parallel_attention, mesh=sub_mesh(n),
                               layout="zigzag", block_q=8, block_k=8, **kwargs)
        got = outputs_and_grads(jax.jit(fn), q, k, v, ct)
        return [relative_error(g, r) for g, r in zip((got[0], *got[1]), (ref[0], *ref[1]))]

    one, eight = errors(1), errors(8)
    for name, e1, e8 in zip(("out", "dq", "dk", "dv"), one, eight):
        assert e8 <= TOLERANCE[jnp.bfloat16], f"{name}: {e8:.3g}"
        assert e8 <= 2 * e1, f"{name}: bf16 error {e8:.3g} at n=8 vs {e1:.3g} at n=1"


def _shard_map_ring(mesh, **kwargs):
    def per_shard(q, k, v, seg, kv_seg):
        return ring_attention(q, k, v, axis_name="sequence", segment_ids=seg,
                              kv_segment_ids=kv_seg, block_q=4, block_k=4, **kwargs)

    seq = P(None, "sequence")
    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(seq,) * 5, out_specs=seq))


def test_kernel_with_separate_key_segments_and_rows_that_see_nothing(mesh4):
    """Inside shard_map directly: kv segment ids differ from q's; empty rows are 0, not NaN."""
    q, k, v, ct = make_inputs(12, batch=2, q_len=64, kv_len=64)
    rng = np.random.default_rng(12)
    seg, kv_seg = random_segments(rng, 2, 64, 5), random_segments(rng, 2, 64, 5)
    kwargs = {"causal": True, "segment_ids": seg, "kv_segment_ids": kv_seg}
    ring = _shard_map_ring(mesh4, causal=True)

    def fn(q, k, v):
        return ring(q, k, v, seg, kv_seg)

    got = outputs_and_grads(fn, q, k, v, ct)
    ref = reference_outputs_and_grads(q, k, v, ct, **kwargs)
    empty = np.asarray(lca.attention(q, k, v, impl="reference", return_lse=True, **kwargs)[1])
    assert np.isinf(empty).any()  # some query sees no key at all
    assert np.all(np.asarray(got[0])[np.isinf(empty)] == 0)
    for name, g, r in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (ref[0], *ref[1])):
        assert relative_error(g, r) <= TOLERANCE[jnp.float32], name


def test_shard_pairs_are_classified_skip_masked_full():
    """Causal, contiguous: earlier shards are FULL, the own shard MASKED, later ones SKIP."""
    spec = masks_lib.MaskSpec(causal=True)
    shards = layouts.shard_positions(32, "contiguous", 4)
    for r in range(4):
        for j in range(4):
            kind = int(shard_pair_kind(spec, shards[r][None], shards[j][None]))
            want = masks_lib.FULL if j < r else masks_lib.MASKED if j == r else masks_lib.SKIP
            assert kind == want, (r, j, kind)
    # Zigzag: no pair is skipped whole (the blockwise tiles skip half of each).
    zig = layouts.shard_positions(32, "zigzag", 4)
    kinds = {int(shard_pair_kind(spec, zig[r][None], zig[j][None]))
             for r in range(4) for j in range(4)}
    assert kinds == {masks_lib.MASKED}
    # Segments that cannot meet skip the pair even without causality.
    seg_spec = masks_lib.MaskSpec(segments=True)
    pos = jnp.arange(8)[None]
    assert int(shard_pair_kind(seg_spec, pos, pos, jnp.zeros((1, 8), int),
                               jnp.ones((1, 8), int))) == masks_lib.SKIP
