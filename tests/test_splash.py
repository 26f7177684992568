"""Splash attention as a local kernel, in Pallas interpret mode, against the float64 reference.

Interpret mode runs the real kernel code on the CPU and every case compiles
its own kernels, so the mesh cases are a covering set (`ring_cases.interpret_cases`);
`LCA_INTERPRET_FULL=1` runs the whole product (2 strategies x 3 layouts x 4
masks x 2 groupings).
"""

import itertools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import (assert_matches_reference, compiled_outputs_and_grads, make_inputs,
                             mask_kwargs, reference_outputs_and_grads)
from jax.sharding import PartitionSpec as P
from ring_cases import check_against_reference, interpret_cases, strategy_case

import lca
from lca.kernels import blockwise, local, masks, platform, splash
from lca.kernels.ring import ring_attention

pytestmark = pytest.mark.filterwarnings("ignore:local kernel 'splash':UserWarning")

LAYOUTS = ("contiguous", "striped", "zigzag")
SEQ = 1024  # 8 shards of 128 tokens: splash's smallest tile


@pytest.mark.parametrize("mask,kv_heads", [("bidirectional", 2), ("causal", 4), ("causal", 2),
                                           ("window", 4), ("causal_segments", 2)])
def test_alone_matches_reference(mask, kv_heads):
    """lca.attention(impl="splash"): output and gradients; the segment case draws q and
    kv packings apart, so some rows see no key (zeros, finite gradients)."""
    q, k, v, ct = make_inputs(0, batch=2, q_len=256, kv_len=256, heads=4, kv_heads=kv_heads,
                              head_dim=16)
    kw = mask_kwargs(mask, 0, 2, 256, 256)
    fn = lambda q, k, v: lca.attention(q, k, v, impl="splash", block_q=128, block_k=128, **kw)
    got = compiled_outputs_and_grads(fn, q, k, v, ct)
    assert_matches_reference(got, reference_outputs_and_grads(q, k, v, ct, **kw),
                             jnp.float32, f"splash/{mask}/kv_heads={kv_heads}")
    if mask == "causal_segments":
        seen = masks.visible(masks.MaskSpec(True, None, True),
                             *masks.make_mask_arrays(2, 256, 256, segment_ids=kw["segment_ids"],
                                                     kv_segment_ids=kw["kv_segment_ids"]))
        unseen = ~np.asarray(seen.any(-1))
        assert unseen.any()
        assert np.all(np.asarray(got[0])[unseen] == 0)


def test_bfloat16_matches_reference():
    q, k, v, ct = make_inputs(1, batch=1, q_len=256, kv_len=256, heads=4, kv_heads=2,
                              head_dim=16, dtype=jnp.bfloat16)
    fn = lambda q, k, v: lca.attention(q, k, v, impl="splash", causal=True, window=100)
    got = compiled_outputs_and_grads(fn, q, k, v, ct)
    assert got[0].dtype == jnp.bfloat16
    assert_matches_reference(got, reference_outputs_and_grads(q, k, v, ct, causal=True,
                                                              window=100),
                             jnp.bfloat16, "splash/bfloat16/window")


@pytest.fixture
def no_fallback(monkeypatch):
    """splash's blockwise fallback returns NaN: a case that matches the reference ran splash
    on every step, never the fallback."""
    def nan(fn):
        return lambda *a: tuple(jnp.full_like(x, jnp.nan) for x in fn(*a))
    monkeypatch.setattr(splash, "blockwise", types.SimpleNamespace(
        forward=nan(blockwise.forward), backward=nan(blockwise.backward)))


@pytest.mark.parametrize("impl,layout,mask,kv_heads", interpret_cases())
def test_strategy_matches_reference(mesh8, no_fallback, impl, layout, mask, kv_heads):
    """splash as the local kernel of ring / allgather over 8 shards, natural order out."""
    check_against_reference(mesh8, layout, mask, kv_heads, impl=impl, local="splash",
                            seq_len=SEQ, batch=1, heads=2, fast_compile=True,
                            block_q=128, block_k=128)


@pytest.mark.parametrize("impl,layout", [("ulysses", "striped"), ("usp", "contiguous")])
def test_all_to_all_strategies_run_splash(no_fallback, impl, layout):
    """ulysses (the gathered striped sequence in natural order) and usp (the ring over
    all-to-all groups) hand splash positions it has a static mask for."""
    mesh, options, heads, kv_heads = strategy_case(impl)
    check_against_reference(mesh, layout, "causal", kv_heads, impl=impl, local="splash",
                            seq_len=SEQ, batch=1, heads=heads, fast_compile=True,
                            block_q=128, block_k=128, **options)


@pytest.mark.parametrize("layout,view", list(itertools.product(LAYOUTS, local.VIEWS)))
def test_every_layout_pair_has_a_static_mask(layout, view):
    """For every (query, key) pair a strategy can hand it, splash picks one of a few
    static masks, never the blockwise fallback; positions of no layout do fall back."""
    placement = local.Placement(layout, 2048, 8, 1, view)
    for spec in (masks.MaskSpec(True), masks.MaskSpec(True, 300)):
        cfg = local.LocalConfig(spec, 1.0, 128, 128, placement)
        q_cands, kv_cands = placement.candidates()
        plan = splash._plan(cfg, len(q_cands[0]), len(kv_cands[0]))
        # Distinct kernels: at most 3 per ring step (empty, full, diagonal) for causal,
        # one per query shard after a gather, 2n with a window (zigzag's chunk pairs).
        bound = {"shards": 3 if spec.window is None else 16, "gathered": 8, "whole": 1}
        assert len(plan.branches) <= bound[view], len(plan.branches)
        for a, b in itertools.product(range(len(q_cands)), range(len(kv_cands))):
            arrays = masks.make_mask_arrays(2, len(q_cands[a]), len(kv_cands[b]),
                                            positions=q_cands[a], kv_positions=kv_cands[b])
            assert int(splash._select(plan, arrays)) == plan.table[a, b]
        odd = masks.make_mask_arrays(2, len(q_cands[0]), len(kv_cands[0]),
                                     positions=q_cands[0][::-1], kv_positions=kv_cands[0])
        assert int(splash._select(plan, odd)) == len(plan.branches)


def test_lowers_for_tpu_alone_and_in_the_ring(mesh8):
    """jax.export for TPU on this CPU: Mosaic custom calls for forward and backward, inside
    the 8-shard ring too, and no dense T x S intermediate."""
    t = 2048
    dt = jnp.bfloat16
    args = [jax.ShapeDtypeStruct((1, t, 4, 128), dt)] + [jax.ShapeDtypeStruct((1, t, 2, 128),
                                                                               dt)] * 2

    def grads(attend):
        def loss(q, k, v):
            return attend(q, k, v).astype(jnp.float32).sum()
        return jax.jit(jax.grad(loss, (0, 1, 2)))

    alone = grads(lambda q, k, v: lca.attention(q, k, v, impl="splash", causal=True))
    ring = grads(lambda q, k, v: lca.sequence_parallel_attention(
        q, k, v, mesh=mesh8, impl="ring", local="splash", layout="zigzag", causal=True))
    for fn, shard in ((alone, t), (ring, t // 8)):
        with platform.lowering_for("tpu"):
            text = jax.export.export(fn, platforms=["tpu"])(*args).mlir_module()
        calls = text.count("custom_call @tpu_custom_call(")
        assert calls >= 2, calls  # a forward and a fused dq/dk/dv kernel at least
        dense = re.findall(rf"tensor<(?:\d+x)*{shard}x(?:\d+x)*{shard}x", text)
        assert not dense, dense[:3]


def test_refuses_what_it_cannot_do(mesh8):
    q = jnp.zeros((1, 200, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="multiples of 128; the nearest that work: 256"):
        lca.attention(q, q, q, impl="splash", causal=True)
    q = jnp.zeros((1, 256, 2, 16), jnp.float64)
    with pytest.raises(ValueError, match="dtype float64"):
        lca.attention(q, q, q, impl="splash")
    q = jnp.zeros((1, 1024, 2, 16), jnp.float32)
    ring = jax.shard_map(lambda q: ring_attention(q, q, q, axis_name="sequence", local="splash",
                                                  causal=True),
                         mesh=mesh8, in_specs=P(None, "sequence"), out_specs=P(None, "sequence"),
                         check_vma=False)
    with pytest.raises(ValueError, match="builds its causal masks before tracing"):
        jax.eval_shape(ring, q)


def test_positions_of_no_placement_run_the_exact_fallback():
    """On one device explicit positions in natural order run splash; others run blockwise."""
    q, k, v, ct = make_inputs(2, batch=1, q_len=256, kv_len=256, heads=2, kv_heads=1,
                              head_dim=16)
    cfg = local.config(splash.KERNEL, q, k, causal=True, window=None, segments=False,
                       scale=None, placement=local.Placement("contiguous", 256))
    plan = splash._plan(cfg, 256, 256)
    for pos, branch in ((jnp.arange(256), 0), (2 * jnp.arange(256), len(plan.branches))):
        arrays = masks.make_mask_arrays(1, 256, 256, positions=pos)
        assert int(splash._select(plan, arrays)) == branch
    pos = 2 * jnp.arange(256)
    fn = lambda q, k, v: lca.attention(q, k, v, impl="splash", causal=True, positions=pos)
    assert_matches_reference(compiled_outputs_and_grads(fn, q, k, v, ct),
                             reference_outputs_and_grads(q, k, v, ct, causal=True,
                                                         positions=pos),
                             jnp.float32, "splash/fallback")
