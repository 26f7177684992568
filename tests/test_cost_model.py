"""tools/cost_model.py predicts exactly what the compiled kernels do: tiles, FLOPs, bytes.

The HLO count of a compiled forward+backward is defined as:
  FLOPs  every dot's FLOPs (2 x result elements x contracted length) sits in a
         branch of a 3-way tile `conditional` (SKIP / MASKED / FULL); each
         branch's dot FLOPs are read from the HLO, and multiplied by how often
         that branch runs: the tile kinds come from the kernel's own
         classification (`blockwise._Tiles`, `ring.shard_pair_kind`) on the
         concrete positions, at every (ring step, rank) of the schedule the
         compiled K/V collective-permute implies. The loops' known trip counts
         must visit every tile of every step once.
  bytes  collective results x the trip counts of the loops around them
         (`lca.bench.hlo`, which the benchmark suite records too): a
         collective-permute sends its result, an all-gather or all-to-all over
         g devices (g-1)/g of its result, a reduce-scatter (g-1) times it.
Inputs are float32 (the CPU backend widens bf16 collectives when compiling).
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ring_cases import sub_mesh

import dataclasses

import lca
from lca import layouts
from lca.bench import hlo as hlo_lib
from lca.bench.figures import load_module
from lca.kernels import blockwise, registry, ring
from lca.kernels import local as local_lib
from lca.kernels import masks as masks_lib
from lca.parallel import attention_in_layout, make_mesh
from lca.parallel.linear import attention_in_layout_linear

cm = load_module("tools/cost_model.py")
report = load_module("tools/cost_report.py")
STRATEGIES = [n for n in registry.names("strategy") if cm.communication(n) in ("ring", "allgather")]
ALL_TO_ALL = [n for n in registry.names("strategy") if cm.communication(n) in cm.ALL_TO_ALL]
tiles = load_module("tools/cost_tiles.py")

BATCH, HEADS, KV_HEADS, HEAD_DIM = 1, 4, 2, 8
SEQ_LEN, BLOCK = 256, 16  # zigzag chunks of 16 at n = 8: several tiles per shard everywhere

# ----------------------------------------------------------------------------- the kernel's tiles


def kernel_kinds(q_pos, kv_pos, block_q, block_k, window=None):
    """int [nq, nk] tile kinds from blockwise._Tiles (the kernel's code, zero-size heads)."""
    q = jnp.zeros((1, len(q_pos), 1, 1), jnp.float32)
    k = jnp.zeros((1, len(kv_pos), 1, 1), jnp.float32)
    cfg = local_lib.config(blockwise.KERNEL, q, k, causal=True, window=window, segments=False,
                           scale=None, block_q=block_q, block_k=block_k)
    arrays = masks_lib.make_mask_arrays(1, len(q_pos), len(kv_pos), positions=q_pos,
                                        kv_positions=kv_pos)
    return np.asarray(blockwise._Tiles(cfg, q, k, k, arrays).kinds)


def kernel_schedule(p, shift=1):
    """{(step, rank): kinds [nq, nk] or None (shard pair skipped)} as the kernels run them."""
    n = p.devices
    pos = layouts.shard_positions(p.seq_len, p.layout, n, p.stripe)
    bq, bk = p.blocks()
    if p.kernel == "allgather":
        return {(0, r): kernel_kinds(pos[r], pos.reshape(-1), bq, bk, p.window) for r in range(n)}
    spec = masks_lib.MaskSpec(True, p.window)
    out = {}
    for s in range(p.ring_steps()):
        for r in range(n):
            q_pos, kv_pos = pos[r], pos[(r - s * shift) % n]
            kind = ring.shard_pair_kind(spec, jnp.asarray(q_pos)[None], jnp.asarray(kv_pos)[None])
            out[s, r] = (None if int(kind) == masks_lib.SKIP
                         else kernel_kinds(q_pos, kv_pos, bq, bk, p.window))
    return out


def counts(schedule, steps, n, kind):
    got = np.zeros((steps, n), np.int64)
    for (s, r), kinds in schedule.items():
        got[s, r] = 0 if kinds is None else int((kinds == kind).sum())
    return got


CASES = [(kernel, layout, n) for kernel in STRATEGIES for layout in cm.LAYOUTS for n in (2, 4, 8)]


@pytest.mark.parametrize("layout,window,block", [
    ("contiguous", None, None),   # default tiles (512 -> the shard)
    ("zigzag", None, None),       # default: one tile per chunk
    ("striped", None, 20),        # 48-token shards in tiles of 20: the last one padded
    ("contiguous", 60, 20),       # a window: the ring stops after window_steps (3)
    ("zigzag", 40, 12),
])
def test_tile_counts_with_padding_windows_and_default_tiles(layout, window, block):
    p = cm.Problem("ring", layout, 384, HEADS, KV_HEADS, HEAD_DIM, 8, window=window,
                   block_q=block, block_k=block)
    masked, full, staircase = cm.tile_counts(p)
    schedule = kernel_schedule(p)
    assert masked.shape[0] == (3 if window and layout == "contiguous" else 8)
    assert (masked == counts(schedule, *masked.shape, masks_lib.MASKED)).all()
    assert (full == counts(schedule, *full.shape, masks_lib.FULL)).all()
    assert (staircase == counts(schedule, *full.shape, masks_lib.STAIRCASE)).all()


def a2a_mesh(a, r):
    """(mesh, axis) of an all-to-all strategy: one axis of a devices, or USP's a x r."""
    if r == 1:
        return sub_mesh(a), "sequence"
    return make_mesh({"ulysses": a, "sequence": r}, devices=jax.devices()[:a * r]), \
        ("ulysses", "sequence")


def _tiles_the_kernel_runs(strategy, layout, seq_len, heads, kv_heads, n, mesh=None,
                           axis="sequence"):
    """(block_q, block_k) the strategy's local kernel is called with, recorded while tracing."""
    seen = []

    def forward(cfg, *args):
        seen.append((cfg.block_q, cfg.block_k))
        return blockwise.forward(cfg, *args)

    recorder = dataclasses.replace(blockwise.KERNEL, name="recorder", forward=forward)
    q = jax.ShapeDtypeStruct((1, seq_len, heads, HEAD_DIM), jnp.float32)
    k = jax.ShapeDtypeStruct((1, seq_len, kv_heads, HEAD_DIM), jnp.float32)
    mesh = sub_mesh(n) if mesh is None else mesh
    jax.eval_shape(lambda q, k: attention_in_layout(q, k, k, mesh=mesh, axis=axis, impl=strategy,
                                                    local=recorder, layout=layout, causal=True),
                   q, k)
    assert len(set(seen)) == 1
    return seen[0]


@pytest.mark.parametrize("layout", cm.LAYOUTS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("seq_len", [1 << 15, 256])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_default_tiles_are_the_ones_the_kernels_run(strategy, layout, heads, kv_heads, seq_len):
    p = cm.Problem(strategy, layout, seq_len, heads, kv_heads, HEAD_DIM, 8)
    assert p.blocks() == _tiles_the_kernel_runs(strategy, layout, seq_len, heads, kv_heads, 8)


@pytest.mark.parametrize("layout", cm.LAYOUTS)
@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("seq_len", [1 << 15, 256])
@pytest.mark.parametrize("strategy,a,r", [("ulysses", 8, 1), ("usp", 2, 4)])
def test_default_tiles_under_an_all_to_all(strategy, a, r, layout, kv_heads, seq_len):
    p = cm.Problem(strategy, layout, seq_len, 8, kv_heads, HEAD_DIM, a * r, a2a=a)
    assert p.blocks() == _tiles_the_kernel_runs(strategy, layout, seq_len, 8, kv_heads, a * r,
                                                *a2a_mesh(a, r))


# ----------------------------------------------------------------------------- compiled HLO


class HloCounts:
    """Dots, tile conditionals and collectives of one compiled module, loops multiplied out."""

    def __init__(self, text):
        self.text = text
        self.comps, self.dims, entry = hlo_lib.parse(text)
        self.tile_switches = []   # (backward?, multiplicity, flops per branch)
        self.stray_flops = 0      # dot FLOPs outside any tile switch
        self.collectives = []     # (opcode, result bytes, multiplicity, backward?, line)
        self._walk(entry, 1, False)

    def _dot_flops(self, typ, line):
        lhs = re.search(r" dot\(%([^,\s)]+)", line).group(1)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
        k = math.prod(self.dims[lhs][int(i)] for i in contracting.split(",") if i)
        return 2 * hlo_lib.type_size(typ)[0] * k

    def _flops(self, comp):
        """Dot FLOPs of one execution of `comp`, loops multiplied out (no conditionals inside)."""
        total = 0
        for _, typ, op, line in self.comps[comp]:
            if op == "dot":
                total += self._dot_flops(typ, line)
            assert op != "conditional", "a conditional inside a tile branch"
            for callee, times in hlo_lib.callees(op, line):
                total += times * self._flops(callee)
        return total

    def _walk(self, comp, times, in_branch):
        for _, typ, op, line in self.comps[comp]:
            backward = "transpose(" in (re.search(r'op_name="([^"]*)"', line) or ["", ""])[1] \
                if 'op_name="' in line else False
            if op == "conditional":
                branches = hlo_lib.branches(line)
                if len(branches) in (3, 4):  # SKIP / MASKED / FULL (/ STAIRCASE)
                    flops = [self._flops(b) for b in branches]
                    self.tile_switches.append((backward, times, flops))
                    continue
                for b in branches:  # the shard pair's skip-or-compute: each at most once
                    self._walk(b, times, True)
                continue
            if op == "dot":
                self.stray_flops += times * self._dot_flops(typ, line)
            if hlo_lib.is_collective(op):
                assert not in_branch, f"a collective inside a conditional: {line[:200]}"
                self.collectives.append((op, hlo_lib.type_size(typ)[1], times, backward, line))
            for callee, trip in hlo_lib.callees(op, line):
                self._walk(callee, times * trip, in_branch)

    def wire_bytes(self, backward):
        """Bytes one device sends: permutes their result; all-gather and all-to-all (g - 1) / g
        of theirs, reduce-scatter g - 1 times its result, over groups of g devices."""
        total = 0
        for op, size, times, bwd, line in self.collectives:
            if bwd == backward:
                total += times * size * hlo_lib.share(op, line)
        assert total == int(total)
        return int(total)

    def ring_shift(self, n, kv_bytes):
        """d such that the forward K/V permute sends rank i's shard to rank i + d."""
        for op, size, _, bwd, line in self.collectives:
            if op == "collective-permute" and size == kv_bytes and not bwd:
                pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[1])
                shifts = {(int(b) - int(a)) % n for a, b in pairs}
                assert len(shifts) == 1
                return shifts.pop()
        raise AssertionError("no forward K/V collective-permute")


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def _forward_backward(attend):
    def run(q, k, v, ct, *extra):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, *extra), q, k, v)
        return (out, *vjp(ct))
    return run


def _specs(mesh, seq_len, heads, kv_heads, head_dim):
    seq = NamedSharding(mesh, P(None, "sequence")) if mesh is not None else None
    shape = lambda h: jax.ShapeDtypeStruct((BATCH, seq_len, h, head_dim), jnp.float32,
                                           sharding=seq)
    return shape(heads), shape(kv_heads), shape(kv_heads), shape(heads)


def hlo_flops(hlo, p, schedule, steps):
    """[steps, n] forward and backward FLOPs by the HLO-count definition (module docstring)."""
    assert hlo.stray_flops == 0, "dot FLOPs outside the tile switches"
    n = p.devices
    some = next(k for k in schedule.values() if k is not None)
    out = []
    for backward in (False, True):
        switches = [(t, f) for b, t, f in hlo.tile_switches if b == backward]
        branch = {tuple(f) for _, f in switches}
        assert len(branch) == 1, branch  # every tile switch of a pass costs the same
        skip, masked, full, *staircase = branch.pop()
        assert skip == 0 and masked == full > 0
        s = blockwise.sub_tiles(*p.blocks())
        assert staircase == ([] if s == 1 else [full * (s + 1) // (2 * s)])  # the sub-tiles
        assert sum(t for t, _ in switches) == steps * some.size  # every tile of every step once
        flops = np.zeros((steps, n), np.int64)
        for (step, r), kinds in schedule.items():
            if kinds is not None:
                flops[step, r] = masked * int((kinds == masks_lib.MASKED).sum()) \
                    + full * int((kinds == masks_lib.FULL).sum()) \
                    + sum(staircase) * int((kinds == masks_lib.STAIRCASE).sum())
        out.append(flops)
    return out


@pytest.fixture(scope="module")
def compiled_softmax():
    """Compiled HLO per (kernel, n); positions are an argument: one program for every layout."""
    cache = {}

    def get(kernel, n):
        if (kernel, n) not in cache:
            mesh = sub_mesh(n)
            attend = lambda q, k, v, pos: attention_in_layout(
                q, k, v, mesh=mesh, impl=kernel, layout="zigzag", causal=True, positions=pos,
                block_q=BLOCK, block_k=BLOCK)
            pos = jax.ShapeDtypeStruct((SEQ_LEN,), jnp.int32,
                                       sharding=NamedSharding(mesh, P("sequence")))
            text = _compile(_forward_backward(attend),
                            *_specs(mesh, SEQ_LEN, HEADS, KV_HEADS, HEAD_DIM), pos)
            cache[kernel, n] = HloCounts(text)
        return cache[kernel, n]

    return get


@pytest.mark.parametrize("kernel,layout,n", CASES)
def test_tiles_flops_and_bytes_equal_the_compiled_hlo(compiled_softmax, kernel, layout, n):
    p = cm.Problem(kernel, layout, SEQ_LEN, HEADS, KV_HEADS, HEAD_DIM, n, batch=BATCH, itemsize=4,
                   block_q=BLOCK, block_k=BLOCK)
    hlo = compiled_softmax(kernel, n)
    wire_f, wire_b = cm.wire_bytes(p)
    assert (hlo.wire_bytes(False), hlo.wire_bytes(True)) == (cm.total_bytes(wire_f),
                                                                   cm.total_bytes(wire_b))
    shift = hlo.ring_shift(n, wire_f["K/V"][0]) if kernel == "ring" else 1
    steps = p.ring_steps() if kernel == "ring" else 1
    schedule = kernel_schedule(p, shift)
    masked, full, staircase = cm.tile_counts(p)
    assert (masked == counts(schedule, steps, n, masks_lib.MASKED)).all()
    assert (full == counts(schedule, steps, n, masks_lib.FULL)).all()
    assert (staircase == counts(schedule, steps, n, masks_lib.STAIRCASE)).all()
    assert staircase.sum() > 0  # the diagonals run as sub-tiles
    want_f, want_b = hlo_flops(hlo, p, schedule, steps)
    got_f, got_b = cm.step_flops(p)
    assert (got_f == want_f).all() and (got_b == want_b).all()


def test_blockwise_flops_equal_the_compiled_hlo():
    attend = lambda q, k, v: lca.attention(q, k, v, impl="blockwise", causal=True, block_q=32,
                                           block_k=32)
    hlo = HloCounts(_compile(_forward_backward(attend), *_specs(None, SEQ_LEN, HEADS, KV_HEADS,
                                                                HEAD_DIM)))
    p = cm.Problem("blockwise", "contiguous", SEQ_LEN, HEADS, KV_HEADS, HEAD_DIM, 1,
                   block_q=32, block_k=32)
    kinds = kernel_kinds(np.arange(SEQ_LEN), np.arange(SEQ_LEN), 32, 32)
    want_f, want_b = hlo_flops(hlo, p, {(0, 0): kinds}, 1)
    got_f, got_b = cm.step_flops(p)
    assert (got_f == want_f).all() and (got_b == want_b).all()
    assert not hlo.collectives


@pytest.mark.parametrize("algorithm,layout,n", [
    (a, "zigzag", n) for a in cm.LINEAR_ALGORITHMS for n in (2, 4, 8)
] + [("ring", "contiguous", 4)])
def test_linear_state_bytes_equal_the_compiled_hlo(algorithm, layout, n):
    mesh = sub_mesh(n)
    attend = lambda q, k, v: attention_in_layout_linear(q, k, v, mesh=mesh, layout=layout,
                                                        algorithm=algorithm, chunk_size=8)
    specs = _specs(mesh, 128, HEADS, HEADS, HEAD_DIM)
    hlo = HloCounts(_compile(_forward_backward(attend), *specs))
    p = cm.Problem("linear", layout, 128, HEADS, HEADS, HEAD_DIM, n, batch=BATCH,
                   linear_algorithm=algorithm)
    wire_f, wire_b = cm.wire_bytes(p)
    assert hlo.wire_bytes(False) == cm.total_bytes(wire_f)
    assert hlo.wire_bytes(True) == cm.total_bytes(wire_b)


@pytest.mark.parametrize("kernel,layout,a,r", [("ulysses", "zigzag", n, 1) for n in (2, 4, 8)] + [
    ("ulysses", "striped", 4, 1), ("usp", "zigzag", 2, 4), ("usp", "zigzag", 4, 2),
    ("usp", "striped", 2, 4)])
def test_all_to_all_bytes_and_flops_equal_the_compiled_hlo(kernel, layout, a, r):
    """Heads 8, kv heads 2: below the degree at a = 4, 8 (copied), a multiple at a = 2."""
    heads, kv_heads = 8, 2
    mesh, axis = a2a_mesh(a, r)
    seq = axis if r == 1 else axis[::-1]
    attend = lambda q, k, v, pos: attention_in_layout(
        q, k, v, mesh=mesh, axis=axis, impl=kernel, layout=layout, causal=True, positions=pos,
        block_q=BLOCK, block_k=BLOCK)
    pos = jax.ShapeDtypeStruct((SEQ_LEN,), jnp.int32, sharding=NamedSharding(mesh, P(seq)))
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(None, seq)))
             for x in _specs(None, SEQ_LEN, heads, kv_heads, HEAD_DIM)]
    hlo = HloCounts(_compile(_forward_backward(attend), *specs, pos))
    p = cm.Problem(kernel, layout, SEQ_LEN, heads, kv_heads, HEAD_DIM, a * r, batch=BATCH,
                   itemsize=4, block_q=BLOCK, block_k=BLOCK, a2a=a)
    wire_f, wire_b = cm.wire_bytes(p)
    assert (hlo.wire_bytes(False), hlo.wire_bytes(True)) == (cm.total_bytes(wire_f),
                                                             cm.total_bytes(wire_b))
    if kernel == "ulysses":
        gathered = tiles.gathered_positions(p)[0]
        kinds = kernel_kinds(gathered, gathered, *p.blocks())
        want_f, want_b = hlo_flops(hlo, p, {(0, rank): kinds for rank in range(a)}, 1)
    else:  # the ring's schedule on the problem after the all-to-all, on each of its a devices
        inner = p.after_all_to_all()
        shift = hlo.ring_shift(r, wire_f["ring K/V"][0])
        want = hlo_flops(hlo, inner, kernel_schedule(inner, shift), inner.ring_steps())
        want_f, want_b = (np.repeat(x, a, 1) for x in want)
    got_f, got_b = cm.step_flops(p)
    assert (got_f == want_f).all() and (got_b == want_b).all()
    assert hlo_lib.sent_bytes(hlo.text) == hlo.wire_bytes(False) + hlo.wire_bytes(True)


# ----------------------------------------------------------------------------- the model itself


def test_balance_of_the_benchmarked_case():
    """T=32768, n=8, causal, default tiles (512; diagonals as 4 x 4 sub-tiles, 5/8 of a tile):
    the tile ratios the load-balance benchmark times. In tiles on the critical path:
    contiguous 7 x 64 + (28 + 8 x 5/8) = 481; striped 8 x (28 + 8 x 5/8) = 264; zigzag
    (28 + 8 x 5/8) + 7 x 32 = 257 (each diagonal whole: 484, 288 and 260)."""
    ratio = {}
    for layout in cm.LAYOUTS:
        f, b = cm.step_flops(cm.Problem("ring", layout, 32768, 2, 2, 64, 8, itemsize=4))
        ratio[layout] = (f + b).max(1).sum()
    assert ratio["striped"] / ratio["contiguous"] == pytest.approx(264 / 481)
    assert ratio["zigzag"] / ratio["contiguous"] == pytest.approx(257 / 481)


def test_cli_prints_a_breakdown(capsys):
    report.main(["--kernel", "ring", "--layout", "zigzag", "--seq_len", "65536", "--devices",
                 "16", "--hardware", "tpu_v5e"])
    out = capsys.readouterr().out
    assert "forward" in out and "backward" in out and "load balance" in out
