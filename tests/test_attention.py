"""lca.attention: every impl against the float64 reference, outputs and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import (FAST_COMPILE, MASKS, assert_matches_reference,
                             compiled_outputs_and_grads,
                             make_inputs, mask_kwargs, outputs_and_grads,
                             reference_outputs_and_grads, relative_error)

import lca
from lca.kernels import registry

# Every local kernel but the oracle itself, as the registry lists them.
# Kernels written for an accelerator run in interpret mode here: tests/test_splash.py etc.
IMPLS = tuple(e.name for e in registry.entries("local")
              if e.name != "reference" and e.platform is None)
# Small tiles so that 100 tokens span several blocks, none of them full.
BLOCKS = {n: {"block_q": 32, "block_k": 24} if registry.get(n).tiles else {} for n in IMPLS}


def check(impl, mask, *, seed=0, dtype=jnp.float32, jit=True, **shape):
    q, k, v, ct = make_inputs(seed, dtype=dtype, **shape)
    kwargs = mask_kwargs(mask, seed, q.shape[0], q.shape[1], k.shape[1])
    fn = functools.partial(lca.attention, impl=impl, **kwargs, **BLOCKS[impl])
    got = compiled_outputs_and_grads(fn, q, k, v, ct) if jit else outputs_and_grads(fn, q, k, v, ct)
    assert got[0].dtype == dtype and got[0].shape == q.shape
    ref = reference_outputs_and_grads(q, k, v, ct, **kwargs)
    assert_matches_reference(got, ref, dtype, f"{impl}/{mask}/{jnp.dtype(dtype).name}")


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("impl", IMPLS)
def test_float32_matches_reference(impl, mask, kv_heads):
    check(impl, mask, kv_heads=kv_heads)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_matches_reference(impl, mask):
    check(impl, mask, dtype=jnp.bfloat16)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("impl", IMPLS)
def test_query_and_key_lengths_differ(impl, mask):
    check(impl, mask, q_len=72, kv_len=130)
    check(impl, mask, q_len=130, kv_len=47, seed=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_without_jit(impl):
    check(impl, "causal_segments", jit=False)


def test_lengths_shorter_than_one_block():
    q, k, v, _ = make_inputs(0, q_len=5, kv_len=7)
    out = lca.attention(q, k, v, causal=True)  # default blocks of 512
    ref = lca.attention(q, k, v, impl="reference", causal=True)
    assert relative_error(out, ref) < 2e-5


def test_explicit_positions_define_the_mask():
    """Causality follows positions, not array order: reversed positions flip it."""
    q, k, v, ct = make_inputs(3, q_len=64, kv_len=64)
    pos = jnp.arange(64)[::-1]
    kwargs = {"causal": True, "window": 9, "positions": pos, "kv_positions": pos}
    ref = reference_outputs_and_grads(q, k, v, ct, **kwargs)
    for impl in IMPLS:
        fn = functools.partial(lca.attention, impl=impl, **kwargs, **BLOCKS[impl])
        assert_matches_reference(outputs_and_grads(fn, q, k, v, ct), ref, jnp.float32, impl)


@pytest.mark.parametrize("impl", ["blockwise", "xla", "reference"])
def test_query_that_sees_no_key_gives_zeros_not_nan(impl):
    q, k, v, ct = make_inputs(4, q_len=48, kv_len=48)
    seg = jnp.zeros((2, 48), jnp.int32)
    kv_seg = seg.at[:, :20].set(1)  # queries 0..19 of segment 0 see only keys 20..
    kwargs = {"causal": True, "segment_ids": seg, "kv_segment_ids": kv_seg}
    fn = functools.partial(lca.attention, impl=impl, **kwargs, **BLOCKS.get(impl, {}))
    out, grads = outputs_and_grads(fn, q, k, v, ct)
    assert np.all(np.asarray(out[:, :20]) == 0)
    assert np.all(np.asarray(grads[0][:, :20]) == 0)
    for x in (out, *grads):
        assert np.all(np.isfinite(np.asarray(x)))


def test_blockwise_log_sum_exp_and_its_gradient():
    q, k, v, _ = make_inputs(5, q_len=70, kv_len=90)
    kwargs = mask_kwargs("causal_segments", 5, 2, 70, 90)

    def lse_of(impl, q, k, v, **opts):
        return lca.attention(q, k, v, impl=impl, return_lse=True, **kwargs, **opts)[1]

    f64 = lambda x: x.astype(jnp.float64)
    lse = lse_of("blockwise", q, k, v, block_q=16, block_k=32)
    ref = lse_of("reference", f64(q), f64(k), f64(v))
    assert lse.dtype == jnp.float32
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref))
    finite = np.isfinite(np.asarray(ref))
    assert finite.sum() > 0 and (~finite).sum() > 0  # both kinds of row occur
    assert relative_error(np.asarray(lse)[finite], np.asarray(ref)[finite]) < 2e-5

    def total(impl, q, k, v, **opts):
        x = lse_of(impl, q, k, v, **opts)
        return jnp.where(jnp.isfinite(x), x, 0).sum()

    grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2)), compiler_options=FAST_COMPILE)
    got = grad(functools.partial(total, "blockwise", block_q=16, block_k=32))(q, k, v)
    want = grad(functools.partial(total, "reference"))(f64(q), f64(k), f64(v))
    for g, w in zip(got, want):
        assert relative_error(g, w) < 2e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_causality_by_gradient(impl):
    """d out[i] / d (k, v)[j] is exactly zero for every later key j, nonzero before."""
    q, k, v, _ = make_inputs(6, batch=1, q_len=96, kv_len=96)

    def out_i(k, v, i):
        return lca.attention(q, k, v, impl=impl, causal=True, **BLOCKS[impl])[:, i].sum()

    grads = jax.jit(jax.grad(out_i, argnums=(0, 1)), compiler_options=FAST_COMPILE)
    for i in (0, 23, 24, 50, 95):
        dk, dv = grads(k, v, i)
        dk, dv = np.asarray(dk), np.asarray(dv)
        assert np.all(dk[:, i + 1:] == 0) and np.all(dv[:, i + 1:] == 0), \
            f"query {i} depends on a later key"
        # Every earlier value matters; keys matter once there are two to choose from.
        assert np.all(np.abs(dv[:, : i + 1]).sum(axis=(-1, -2)) > 0)
        assert i == 0 or np.all(np.abs(dk[:, : i + 1]).sum(axis=(-1, -2)) > 0)


@pytest.mark.parametrize("mask, kv_heads", [("causal", 2), ("window", 1), ("causal_segments", 4)])
def test_blockwise_staircase_tiles_match_reference(mask, kv_heads):
    """Square tiles of 32: causal diagonals run as 4 x 4 sub-tiles (STAIRCASE), with a window,
    documents and grouped heads; 100 tokens, so the last tile is padded."""
    from lca.kernels import blockwise, masks as masks_lib

    q, k, v, ct = make_inputs(3, kv_heads=kv_heads)
    kwargs = mask_kwargs(mask, 3, q.shape[0], q.shape[1], k.shape[1])
    fn = functools.partial(lca.attention, impl="blockwise", block_q=32, block_k=32, **kwargs)
    assert_matches_reference(compiled_outputs_and_grads(fn, q, k, v, ct),
                             reference_outputs_and_grads(q, k, v, ct, **kwargs), jnp.float32,
                             f"staircase/{mask}")
    arrays = masks_lib.make_mask_arrays(2, 100, 100, segment_ids=kwargs.get("segment_ids"),
                                        kv_segment_ids=kwargs.get("kv_segment_ids"))
    spec = masks_lib.MaskSpec(True, kwargs.get("window"), "segment_ids" in kwargs)
    kinds = np.asarray(masks_lib.classify_tiles(spec, arrays, 32, 32, blockwise.sub_tiles(32, 32)))
    assert (kinds == masks_lib.STAIRCASE).sum() >= 3, kinds  # the diagonal tiles but padding's


def test_blockwise_is_exact_for_every_block_shape():
    """Block sizes are a speed choice only: 1, primes, larger than the input."""
    q, k, v, ct = make_inputs(7, q_len=37, kv_len=41)
    kwargs = mask_kwargs("causal_segments", 7, 2, 37, 41)
    ref = reference_outputs_and_grads(q, k, v, ct, **kwargs)
    for bq, bk in [(1, 1), (7, 5), (37, 41), (64, 64), (16, 41)]:
        fn = functools.partial(lca.attention, **kwargs, block_q=bq, block_k=bk)
        assert_matches_reference(compiled_outputs_and_grads(fn, q, k, v, ct), ref,
                                 jnp.float32, f"blocks {bq}x{bk}")
