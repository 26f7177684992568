"""What the compiled ring does, read without running it: collectives, hops, memory."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ring_cases import sub_mesh

from lca.parallel import attention_in_layout

HEADS, KV_HEADS, HEAD_DIM, BATCH = 8, 2, 16, 2


def _specs(mesh, seq_len, dtype, *, segments=False):
    seq = NamedSharding(mesh, P(None, "sequence"))
    q = jax.ShapeDtypeStruct((BATCH, seq_len, HEADS, HEAD_DIM), dtype, sharding=seq)
    kv = jax.ShapeDtypeStruct((BATCH, seq_len, KV_HEADS, HEAD_DIM), dtype, sharding=seq)
    args = [q, kv, kv, q]  # the last is the output cotangent
    if segments:
        args.append(jax.ShapeDtypeStruct((BATCH, seq_len), jnp.int32, sharding=seq))
    return args


def _forward_backward(mesh, **kwargs):
    """(q, k, v, d_out[, segment_ids]) -> (out, dq, dk, dv), all sharded on the sequence."""
    def run(q, k, v, ct, seg=None):
        def attend(q, k, v):
            return attention_in_layout(q, k, v, mesh=mesh, segment_ids=seg, **kwargs)
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(ct))
    return run


def test_kv_moves_only_by_collective_permute_of_kv_head_buffers(mesh8):
    """Compiled HLO: no all-gather or all-to-all; every moved buffer has kv_heads, not heads."""
    seq_len = 256
    args = _specs(mesh8, seq_len, jnp.bfloat16, segments=True)
    fn = jax.jit(_forward_backward(mesh8, causal=True, layout="zigzag"))
    lowered = fn.lower(*args)
    hlo = lowered.compile().as_text()
    for op in ("all-gather", "all-to-all", "all-reduce", "reduce-scatter"):
        assert f" {op}(" not in hlo and f" {op}-start(" not in hlo, f"{op} on the ring path"
    shard = seq_len // 8
    kv_buffer = f"[2,{BATCH},{shard},{KV_HEADS},{HEAD_DIM}]"  # K and V stacked, kv heads only
    moved = re.findall(r"= (\w+)(\[[\d,]*\])\S* collective-permute(?:-start)?\(", hlo)
    assert moved, "no collective-permute in the compiled ring"
    shapes = {shape for _, shape in moved}
    assert shapes <= {kv_buffer, f"[{BATCH},{shard}]"}, shapes  # K/V(+grads), positions, segments
    assert any(shape == kv_buffer for shape in shapes)
    # K and V leave in the input dtype (the CPU backend may widen bf16 transfers later).
    stablehlo = lowered.as_text()
    sent = re.findall(r"collective_permute.*?\((tensor<[^)]*>)\) ->", stablehlo)
    kv_type = f"tensor<2x{BATCH}x{shard}x{KV_HEADS}x{HEAD_DIM}x"
    assert sent.count(f"{kv_type}bf16>") == 2, sent  # K/V: forward ring, backward ring
    assert sent.count(f"{kv_type}f32>") == 2, sent   # dK/dV: with their block, then home
    assert len(sent) == 8, sent  # and positions, segment ids twice each


def _ppermutes(jaxpr, times=1):
    """[(shape, dtype, executions)] of every ppermute, scans unrolled by their length."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ppermute":
            found += [(tuple(v.aval.shape), str(v.aval.dtype), times) for v in eqn.invars]
        inner = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _ppermutes(sub, inner)
    return found


def _kv_hops(mesh, seq_len, **kwargs):
    """(forward K/V hops, backward K/V hops, dK/dV hops) of one forward+backward."""
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _specs(mesh, seq_len, jnp.float32)]
    jaxpr = jax.make_jaxpr(_forward_backward(mesh, **kwargs))(*args).jaxpr
    kv_shape = (2, BATCH, seq_len // mesh.shape["sequence"], KV_HEADS, HEAD_DIM)
    hops = [t for shape, _, t in _ppermutes(jaxpr) if shape == kv_shape]
    return hops


@pytest.mark.parametrize("n", [2, 8])
def test_the_ring_takes_n_minus_1_hops_none_wasted(n):
    # K/V: n - 1 hops forward and n - 1 backward; dK/dV: n - 1 with their block, 1 home.
    hops = _kv_hops(sub_mesh(n), 64, causal=True, layout="striped")
    assert sorted(hops) == sorted([n - 1, n - 1, n - 1, 1]), hops


@pytest.mark.parametrize("seq_len,steps", [(128, 3), (256, 2), (512, 2), (1024, 2)])
def test_causal_window_on_contiguous_layout_takes_only_the_hops_it_needs(mesh8, seq_len, steps):
    """window 24: ceil((24 - 1) / shard_len) + 1 steps, flat as T grows; not the n = 8 ring."""
    hops = _kv_hops(mesh8, seq_len, causal=True, window=24, layout="contiguous")
    assert sorted(hops) == sorted([steps - 1, steps - 1, steps - 1, 1]), hops


def test_window_on_balanced_layouts_takes_the_whole_ring(mesh8):
    hops = _kv_hops(mesh8, 128, causal=True, window=24, layout="zigzag")
    assert sorted(hops) == [1, 7, 7, 7]


def _temp_bytes(mesh, seq_len):
    seq = NamedSharding(mesh, P(None, "sequence"))
    q = jax.ShapeDtypeStruct((1, seq_len, 4, 64), jnp.float32, sharding=seq)
    kv = jax.ShapeDtypeStruct((1, seq_len, 2, 64), jnp.float32, sharding=seq)
    fn = jax.jit(_forward_backward(mesh, causal=True, layout="zigzag"))
    return fn.lower(q, kv, kv, q).compile().memory_analysis().temp_size_in_bytes


def test_memory_per_device_is_linear_in_shard_length(mesh8):
    small, large = _temp_bytes(mesh8, 8192), _temp_bytes(mesh8, 16384)
    assert large <= 2.2 * small, f"T=8192: {small} B, T=16384: {large} B per device"
