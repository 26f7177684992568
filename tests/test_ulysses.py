"""All-to-all (Ulysses) and Ulysses x ring (USP) against the float64 reference, and compiled.

Heads 8; kv heads 8 (they split over the all-to-all degree) or fewer than the
degree (copied to the devices that read them). Every layout x mask x head
grouping: Ulysses at n = 2, 4, 8; USP on (all-to-all 2, ring 4) and (4, 2).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ring_cases import LAYOUTS, MASKS, check_against_reference, sub_mesh

import lca
from lca.kernels import blockwise, registry
from lca.kernels import local as local_lib
from lca.parallel import attention_in_layout, make_mesh

HEADS = 8
FEW_KV = {2: 1, 4: 2, 8: 2}  # kv heads below the all-to-all degree


def kv_heads(kind, degree):
    return HEADS if kind == "mha" else FEW_KV[degree]


def usp_mesh(a2a, ring_size):
    return make_mesh({"ulysses": a2a, "sequence": ring_size},
                     devices=jax.devices()[:a2a * ring_size])


MESHES = [("ulysses", 8, 1), ("ulysses", 2, 1), ("ulysses", 4, 1), ("usp", 2, 4), ("usp", 4, 2)]


@pytest.mark.parametrize("heads", ["mha", "gqa"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl,a2a,ring_size", MESHES)
def test_against_the_reference(mesh8, impl, a2a, ring_size, layout, mask, heads):
    """(a2a, ring_size): the all-to-all degree and, for usp, the ring's devices."""
    if impl == "ulysses":
        mesh, axis = (mesh8 if a2a == 8 else sub_mesh(a2a)), "sequence"
    else:
        mesh, axis = usp_mesh(a2a, ring_size), ("ulysses", "sequence")
    check_against_reference(mesh, layout, mask, kv_heads(heads, a2a), impl=impl, axis=axis,
                            heads=HEADS, fast_compile=True)


@pytest.mark.parametrize("local", [e.name for e in registry.entries("local")
                                   if e.shards and e.platform is None])
def test_every_local_kernel_under_both(mesh8, local):
    check_against_reference(mesh8, "zigzag", "causal_segments", 2, impl="ulysses", heads=HEADS,
                            local=local, fast_compile=True)
    check_against_reference(usp_mesh(2, 4), "striped", "window", 1, impl="usp",
                            axis=("ulysses", "sequence"), heads=HEADS, local=local,
                            fast_compile=True)


def test_heads_split_over_tensor_and_all_to_all():
    """The rules put heads on `tensor` too: the degree divides each device's heads."""
    mesh = make_mesh({"tensor": 2, "sequence": 4})
    check_against_reference(mesh, "zigzag", "causal", 2, impl="ulysses", heads=HEADS,
                            fast_compile=True)
    with pytest.raises(ValueError, match=r"heads \(2\) must divide by the 4 devices"):
        _call(mesh, heads=4, kv=4)


# ----------------------------------------------------------------------------- compiled


def _compiled(mesh, impl, seq_len, kv, axis="sequence", layout="zigzag", dtype=jnp.float32):
    seq = NamedSharding(mesh, P(None, axis if isinstance(axis, str) else axis[::-1]))
    q = jax.ShapeDtypeStruct((2, seq_len, HEADS, 16), dtype, sharding=seq)
    k = jax.ShapeDtypeStruct((2, seq_len, kv, 16), dtype, sharding=seq)

    def run(q, k, v, ct):
        out, vjp = jax.vjp(lambda q, k, v: attention_in_layout(
            q, k, v, mesh=mesh, impl=impl, axis=axis, layout=layout, causal=True), q, k, v)
        return (out, *vjp(ct))

    return jax.jit(run).lower(q, k, k, q).compile()


def _collectives(hlo):
    """[(op, dtype, shape)] of every collective in compiled HLO text; an op whose result is a
    tuple (the CPU backend's all-to-all: one part per device) gives one entry per part."""
    ops = "all-gather|collective-permute|all-reduce|reduce-scatter|all-to-all"
    found = []
    for result, op in re.findall(rf"= (\(.*?\)|\S+) ({ops})(?:-start)?\(", hlo):
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result):
            found.append((op, dtype, tuple(int(d) for d in dims.split(",") if d)))
    return found


@pytest.mark.parametrize("kv", [8, 2])
def test_ulysses_moves_q_k_v_and_o_only_by_all_to_all(mesh8, kv):
    """No all-gather of K/V; with kv_heads < n each device receives one kv head (the n / K
    copies of each head), never all kv heads."""
    seq_len = 256
    found = _collectives(_compiled(mesh8, "ulysses", seq_len, kv).as_text())
    floats = [(op, shape) for op, dtype, shape in found if dtype.startswith(("f", "bf"))]
    assert {op for op, _ in floats} == {"all-to-all"}, found
    ids = {(op, dtype) for op, dtype, _ in found if dtype.startswith(("s", "u"))}
    assert ids <= {("all-gather", "s32")}, ids  # positions, gathered once
    # Every part of every all-to-all is one device's tokens of one head: q, o and their
    # gradients split 8 heads over 8 devices; K/V (8 heads, or 2 copied 4 times) the same.
    shapes = {shape for _, shape in floats}
    assert shapes == {(2, seq_len // 8, 1, 16)}, shapes
    a2a_parts = sum(1 for op, _ in floats if op == "all-to-all")
    assert a2a_parts == 8 * 8, a2a_parts  # q, k, v, o forward; do, dq, dk, dv backward


def test_usp_has_all_to_all_on_the_first_axis_and_permutes_on_the_second():
    mesh = usp_mesh(2, 4)
    found = _collectives(_compiled(mesh, "usp", 256, 2, axis=("ulysses", "sequence")).as_text())
    ops = {op for op, dtype, _ in found if dtype.startswith(("f", "bf"))}
    assert ops == {"all-to-all", "collective-permute"}, found


def test_ulysses_memory_per_device_is_linear_in_length(mesh8):
    temp = lambda t: _compiled(mesh8, "ulysses", t, 2).memory_analysis().temp_size_in_bytes
    small, large = temp(8192), temp(16384)  # default tiles 512 at both (a zigzag chunk >= 512)
    assert large <= 2.2 * small, f"T=8192: {small} B, T=16384: {large} B per device"


# ----------------------------------------------------------------------------- refused


def _call(mesh, impl="ulysses", heads=8, kv=8, seq_len=64, **kwargs):
    q = jnp.zeros((2, seq_len, heads, 8), jnp.float32)
    k = jnp.zeros((2, seq_len, kv, 8), jnp.float32)
    return lca.sequence_parallel_attention(q, k, k, mesh=mesh, impl=impl, **kwargs)


@pytest.mark.parametrize("mesh,kwargs,message", [
    ("8", {"heads": 6, "kv": 6}, r"heads \(6\) must divide by the 8 devices of axis 'sequence';"
                                 r" degrees that would work: \[1, 2, 3, 6\]"),
    ("4", {"heads": 12, "kv": 3}, r"kv_heads \(3\) must divide by, or divide, the 4 devices"
                                  r".*would work: \[1, 2, 4, 12\]"),
    ("2x4", {"axis": ("ulysses", "sequence")}, r"impl='ulysses' takes one mesh axis"),
    ("2x4", {"impl": "usp"}, r"impl='usp' takes axis=\(all-to-all axis, ring axis\)"),
    ("2x4", {"impl": "usp", "axis": ("sequence", "sequence")}, r"two different ones"),
    ("2x4", {"impl": "usp", "axis": ("ulysses", "ring")}, r"axis='ring' is not an axis"),
    ("2x4", {"impl": "usp", "axis": ("a", "b", "c")}, r"one mesh axis or two different ones"),
    ("2x4", {"impl": "usp", "axis": ("ulysses", "sequence"), "seq_len": 36},
     r"sequence length 36 does not fit layout='zigzag' over 4 shards"),
    ("2x4", {"impl": "usp", "axis": ("ulysses", "sequence"), "seq_len": 36,
             "layout": "contiguous"},
     r"sequence length 36 does not split over the 8 devices .* multiple of 8; nearest valid"
     r" lengths: \[32, 40\]"),
])
def test_bad_input_names_the_option_and_the_valid_values(mesh8, mesh, kwargs, message):
    mesh = {"8": mesh8, "4": sub_mesh(4), "2x4": usp_mesh(2, 4)}[mesh]
    with pytest.raises(ValueError, match=message):
        _call(mesh, **kwargs)


@pytest.mark.parametrize("impl,mesh", [("ulysses", "8"), ("usp", "2x4")])
@pytest.mark.parametrize("mask,kwargs", [("window", {"window": 8}),
                                         ("segments", {"segment_ids": jnp.zeros((2, 64), int)})])
def test_a_local_kernel_without_the_mask_is_refused(mesh8, impl, mesh, mask, kwargs):
    causal_only = dataclasses.replace(blockwise.KERNEL, name="causal_only",
                                      supports=local_lib.Supports(masks=("causal",)))
    mesh = {"8": mesh8, "2x4": usp_mesh(2, 4)}[mesh]
    axis = {"ulysses": "sequence", "usp": ("ulysses", "sequence")}[impl]
    with pytest.raises(ValueError, match=rf"causal_only.*{mask}"):
        _call(mesh, impl=impl, axis=axis, local=causal_only, causal=True, **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_local_kernel_sees_whole_chunks_so_causal_tiles_are_skipped(mesh8, layout):
    """After the all-to-all the local kernel gets the whole sequence in an order whose tiles
    are contiguous runs of positions (striped reordered to natural order), so about half
    of the causal tiles are skipped, as on one device."""
    seen = []

    def forward(cfg, q, k, v, arrays):
        jax.debug.callback(lambda pos: seen.append(np.asarray(pos)), arrays.q_pos)
        return blockwise.forward(cfg, q, k, v, arrays)

    recorder = dataclasses.replace(blockwise.KERNEL, name="recorder", forward=forward)
    q = jnp.zeros((1, 512, 8, 8), jnp.float32)
    jax.block_until_ready(attention_in_layout(q, q, q, mesh=mesh8, impl="ulysses",
                                              layout=layout, local=recorder, causal=True,
                                              block_q=32, block_k=32))
    assert len(seen) == 8
    for pos in seen:
        blocks = pos.reshape(-1, 512 // 32, 32)
        assert (np.ptp(blocks, axis=-1) == 31).all(), "a tile that is not a run of positions"
        lo, hi = blocks.min(-1), blocks.max(-1)
        skipped = (hi[..., :, None] < lo[..., None, :]).mean()
        assert skipped == pytest.approx((16 * 15 / 2) / 16**2)
