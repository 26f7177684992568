"""The Pallas GPU (Triton) kernel against the float64 reference, in interpret mode on CPU.

Interpret mode is slow, so shapes are tiny (B=1, T=S=64, D=16, tiles of 16 and
32: several tiles of every kind). The CUDA lowering is checked by exporting
forward + backward for platforms=["cuda"] from this CPU machine; it does not
run here. The mesh cases are a covering set (`ring_cases.interpret_cases`;
LCA_INTERPRET_FULL=1 runs the whole product).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import (assert_matches_reference, compiled_outputs_and_grads, make_inputs,
                             mask_kwargs, reference_outputs_and_grads)
from ring_cases import check_against_reference, interpret_cases

import lca
from lca.kernels import local, masks, pallas_gpu, platform
from lca.kernels.pallas_gpu import KERNEL

pytestmark = pytest.mark.filterwarnings("ignore:local kernel 'pallas_gpu':UserWarning")

MASKS = ("bidirectional", "causal", "window", "causal_segments")
HEADS = {"mha": 4, "gqa": 2}  # kv_heads for 4 query heads
BLOCKS = {"block_q": 32, "block_k": 16}


def _config(q, k, kwargs, **blocks):
    return local.config(KERNEL, q, k, causal=kwargs.get("causal", False),
                        window=kwargs.get("window"), segments="segment_ids" in kwargs,
                        scale=None, **{**BLOCKS, **blocks})


def _arrays(q, k, kwargs):
    return masks.make_mask_arrays(q.shape[0], q.shape[1], k.shape[1],
                                  segment_ids=kwargs.get("segment_ids"),
                                  kv_segment_ids=kwargs.get("kv_segment_ids"))


def _attention(kwargs, **blocks):
    """(q, k, v) -> output in q's dtype, through `local.attend`'s custom_vjp."""
    def fn(q, k, v):
        return local.attend(KERNEL, _config(q, k, kwargs, **blocks), q, k, v,
                            _arrays(q, k, kwargs))[0]
    return fn


def check(mask, kv_heads, *, dtype=jnp.float32, q_len=64, kv_len=64, seed=0, **blocks):
    q, k, v, ct = make_inputs(seed, batch=1, q_len=q_len, kv_len=kv_len, heads=4,
                              kv_heads=kv_heads, head_dim=16, dtype=dtype)
    kwargs = mask_kwargs(mask, seed, 1, q_len, kv_len)
    got = compiled_outputs_and_grads(_attention(kwargs, **blocks), q, k, v, ct)
    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert_matches_reference(got, reference_outputs_and_grads(q, k, v, ct, **kwargs), dtype,
                             f"pallas_gpu/{mask}/kv_heads={kv_heads}/{jnp.dtype(dtype).name}")


def test_interpret_mode_off_a_gpu():
    assert jax.default_backend() != "gpu" and pallas_gpu.interpret_mode()
    with platform.lowering_for("gpu"):
        assert not pallas_gpu.interpret_mode()
    assert pallas_gpu.interpret_mode()


@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("mask", MASKS)
def test_output_and_gradients_match_the_reference(mask, heads):
    check(mask, HEADS[heads])


def test_bfloat16_grouped_query_causal():
    check("causal", HEADS["gqa"], dtype=jnp.bfloat16)


@pytest.mark.parametrize("mask", ["bidirectional", "causal_segments"])
def test_lengths_padded_to_whole_tiles(mask):
    """q_len 80 (3 query tiles of 32, the last half padding); kv_len 48 (block_k 64 covers
    it: one key tile, rounded up to 64, its last 16 keys padding that no query may see)."""
    check(mask, HEADS["gqa"], q_len=80, kv_len=48, block_q=32, block_k=64)


def test_rows_that_see_no_key_get_zeros_and_finite_gradients():
    """Query segment 9 has no key: out 0, lse -inf, its dq 0, every gradient finite."""
    q, k, v, ct = make_inputs(3, batch=1, q_len=64, kv_len=64, heads=4, kv_heads=2,
                              head_dim=16)
    q_seg = jnp.asarray(np.repeat([0, 9, 1, 9], 16)[None], jnp.int32)  # whole tiles and parts
    kv_seg = jnp.asarray(np.repeat([0, 1], 32)[None], jnp.int32)
    kwargs = {"causal": True, "segment_ids": q_seg, "kv_segment_ids": kv_seg}
    cfg, arrays = _config(q, k, kwargs), _arrays(q, k, kwargs)
    out, lse = jax.jit(functools.partial(pallas_gpu.forward, cfg))(q, k, v, arrays)
    empty = np.asarray(q_seg[0] == 9)
    assert np.all(np.asarray(out)[:, empty] == 0) and np.all(np.isneginf(lse[:, empty]))
    assert np.all(np.isfinite(lse[:, ~empty]))
    got = compiled_outputs_and_grads(_attention(kwargs), q, k, v, ct)
    assert all(np.all(np.isfinite(g)) for g in got[1])
    assert np.all(np.asarray(got[1][0])[:, empty] == 0)
    assert_matches_reference(got, reference_outputs_and_grads(q, k, v, ct, **kwargs),
                             jnp.float32, "empty rows")


def test_causal_schedule_runs_half_the_tiles_of_bidirectional():
    """The kernels' own schedule: non-SKIP tile pairs (K/V tile loads and dots) at T = S = 1024."""
    q = jax.ShapeDtypeStruct((1, 1024, 4, 64), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 1024, 2, 64), jnp.float32)
    arrays = masks.make_mask_arrays(1, 1024, 1024)

    def kinds(**kwargs):
        return np.asarray(pallas_gpu.tile_schedule(_config(q, k, kwargs, block_q=64,
                                                           block_k=64), q, k, arrays))

    bidir, causal = kinds(), kinds(causal=True)
    assert bidir.shape == (16, 16) and np.all(bidir == masks.FULL)
    run = (causal != masks.SKIP).sum()
    assert run == 16 * 17 // 2 and 0.5 <= run / bidir.size <= 0.55
    assert (causal == masks.MASKED).sum() == 16  # only the diagonal builds a mask
    window = kinds(causal=True, window=128)
    assert (window != masks.SKIP).sum() == 16 + 15 + 14  # a band three tiles wide


def test_skipped_tiles_are_never_loaded():
    """NaN keys and values in the last key tile: causal rows before it stay finite."""
    q, k, v, _ = make_inputs(4, batch=1, q_len=64, kv_len=64, heads=4, kv_heads=2,
                             head_dim=16)
    k, v = k.at[:, 48:].set(jnp.nan), v.at[:, 48:].set(jnp.nan)
    kwargs = {"causal": True}
    out, _ = jax.jit(functools.partial(pallas_gpu.forward, _config(q, k, kwargs)))(
        q, k, v, _arrays(q, k, kwargs))
    out = np.asarray(out)
    assert np.all(np.isfinite(out[:, :32])) and np.all(np.isnan(out[:, 48:]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_backward_lower_to_triton_for_cuda(dtype):
    """jax.export for CUDA on this CPU host: three Triton custom calls, no [T, S] tensor."""
    t = s = 1024
    kwargs = {"causal": True, "segment_ids": None}

    def f(q, k, v, seg, kv_seg):
        kw = {**kwargs, "segment_ids": seg, "kv_segment_ids": kv_seg}
        cfg = _config(q, k, kw, block_q=64, block_k=32)

        def loss(q, k, v):
            out, lse = local.attend(KERNEL, cfg, q, k, v, _arrays(q, k, kw))
            return out.astype(jnp.float32).sum() + lse.sum()
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    args = [jax.ShapeDtypeStruct((2, t, 8, 64), dtype), jax.ShapeDtypeStruct((2, s, 2, 64), dtype),
            jax.ShapeDtypeStruct((2, s, 2, 64), dtype), jax.ShapeDtypeStruct((2, t), jnp.int32),
            jax.ShapeDtypeStruct((2, s), jnp.int32)]
    target = "__gpu$xla.gpu.triton"
    with platform.lowering_for("gpu"):
        exported = jax.export.export(
            jax.jit(f), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*args)
    text = exported.mlir_module()
    assert text.count(f"stablehlo.custom_call @{target}(") == 3
    names = re.findall(r'name = "(lca_pallas_gpu_\w+)"', text)
    assert sorted(names) == ["lca_pallas_gpu_dkv", "lca_pallas_gpu_dq", "lca_pallas_gpu_forward"]
    shapes = [dims.split("x") for dims in re.findall(r"tensor<((?:\d+x)+)\w+>", text)]
    dense = [d for d in shapes if d.count(str(t)) >= 2]
    assert not dense, f"a dense T x S intermediate: {dense[:3]}"


def test_lowers_to_triton_inside_the_ring_over_8_shards(mesh8):
    """The whole sharded program exports for CUDA: the ring's steps call the three Triton
    kernels, K/V move by collective-permute, no shard-sized T x S tensor."""
    t = 2048
    args = [jax.ShapeDtypeStruct((1, t, 4, 64), jnp.bfloat16)] + [
        jax.ShapeDtypeStruct((1, t, 2, 64), jnp.bfloat16)] * 2

    def loss(q, k, v):
        return lca.sequence_parallel_attention(q, k, v, mesh=mesh8, impl="ring",
                                               local="pallas_gpu", layout="zigzag",
                                               causal=True).astype(jnp.float32).sum()
    target = "__gpu$xla.gpu.triton"
    with platform.lowering_for("gpu"):
        text = jax.export.export(
            jax.jit(jax.grad(loss, (0, 1, 2))), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(
                *args).mlir_module()
    names = set(re.findall(r'name = "(lca_pallas_gpu_\w+)"', text))
    assert names == {"lca_pallas_gpu_dkv", "lca_pallas_gpu_dq", "lca_pallas_gpu_forward"}
    assert "collective_permute" in text
    shard = t // 8
    dense = re.findall(rf"tensor<(?:\d+x)*{shard}x(?:\d+x)*{shard}x", text)
    assert not dense, dense[:3]


@pytest.mark.parametrize("shape,dtype,blocks,message", [
    ((64, 20), jnp.float32, {}, r"head_dim 20: pallas_gpu takes head_dim in"),
    ((64, 16), jnp.float64, {}, r"dtype float64: pallas_gpu takes .* float32 or all bfloat16"),
    ((64, 16), jnp.float32, {"block_q": 48}, r"block_q 48 is not a power of two.*use 32 or 64"),
    ((64, 16), jnp.float32, {"block_k": 8}, r"block_k 8 is below 16"),
])
def test_unsupported_calls_raise_before_tracing(shape, dtype, blocks, message):
    q = jax.ShapeDtypeStruct((1, shape[0], 4, shape[1]), dtype)
    k = jax.ShapeDtypeStruct((1, shape[0], 2, shape[1]), dtype)
    cfg = _config(q, k, {}, **blocks)
    with pytest.raises(ValueError, match=message):
        pallas_gpu.forward(cfg, q, k, k, masks.make_mask_arrays(1, shape[0], shape[0]))
    if not blocks:  # what the registry asks before a strategy runs it
        assert KERNEL.unsupported(q, k, cfg.spec) is not None


@pytest.mark.parametrize("impl,layout,mask,kv_heads", interpret_cases())
def test_strategy_matches_reference(mesh8, impl, layout, mask, kv_heads):
    """pallas_gpu as the local kernel of ring / allgather over 8 shards of 32 tokens."""
    check_against_reference(mesh8, layout, mask, kv_heads, impl=impl, local="pallas_gpu",
                            seq_len=256, batch=1, heads=2, head_dim=16, fast_compile=True,
                            block_q=16, block_k=16)
