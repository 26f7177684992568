"""Which tiles each device computes, per ring step: the cost model's tile counts (NumPy).

`tools/cost_model.py` multiplies these by a tile's FLOPs. The rules mirror
the kernels: a shard pair is classified from its position extremes (a fully
masked pair runs nothing, `ring.shard_pair_kind`), and every (bq x bk) tile
of a pair that runs is SKIP / MASKED / FULL / STAIRCASE by the per-block
min/max rule of `masks.classify_tiles` (STAIRCASE: a MASKED tile whose
sub-tiles above the diagonal are all SKIP, when the local kernel is blockwise
and `blockwise.sub_tiles` splits its tiles). `tests/test_cost_model.py` checks the counts
against the kernels' own classification and the compiled HLO.
"""

import functools

import numpy as np

from lca import layouts
from lca.kernels import blockwise, registry


def shard_positions(seq_len, layout, n, stripe=1):
    """int64 [n, L]: global positions each shard holds (`lca.layouts.shard_positions`)."""
    return layouts.shard_positions(seq_len, layout, n, stripe).astype(np.int64)


def gathered_positions(p):
    """int64 [1, T]: the positions an all-to-all device's local kernel sees, in its order:
    the layout's shards one after another, or natural order where the strategy reorders
    them (`ulysses.layout_options`: striped)."""
    pos = shard_positions(p.seq_len, p.layout, p.devices, p.stripe).reshape(1, -1)
    entry = registry.get(p.kernel)
    options = entry.layout_options(p.layout, p.causal, p.window, p.shard_len, p.devices,
                                   stripe=p.stripe)
    return np.sort(pos, axis=-1) if "reorder" in options else pos


def block_extremes(pos, block, padded_len=None):
    """(min, max, padded) per block of the last axis, padded to `padded_len` (default whole
    blocks); padding excluded, as masks.block_stats."""
    length = pos.shape[-1]
    total = padded_len or -(-length // block) * block
    nb = total // block
    widths = [(0, 0)] * (pos.ndim - 1) + [(0, total - length)]
    lo = np.pad(pos, widths, constant_values=np.iinfo(np.int64).max)
    hi = np.pad(pos, widths, constant_values=np.iinfo(np.int64).min)
    shape = pos.shape[:-1] + (nb, block)
    padded = (np.arange(total) >= length).reshape(nb, block).any(-1)
    return lo.reshape(shape).min(-1), hi.reshape(shape).max(-1), padded


def classify(q, k, causal, window):
    """(masked, full) bool [..., nq, nk] from (min, max, padded) extremes, as classify_blocks."""
    qmin, qmax = q[0][..., :, None], q[1][..., :, None]
    kmin, kmax = k[0][..., None, :], k[1][..., None, :]
    shape = np.broadcast_shapes(qmin.shape, kmin.shape)
    none, every = np.zeros(shape, bool), np.ones(shape, bool)
    if causal:
        none |= qmax < kmin
        every &= qmin >= kmax
        if window is not None:
            none |= qmin - kmax >= window
            every &= qmax - kmin < window
    full = every & ~k[2]
    return ~none & ~full, ~none & full


def kinds(q_pos, kv_pos, bq, bk, sub, causal, window):
    """(masked, full, staircase) bool [..., nq, nk] of query positions [..., Lq] against key
    positions [..., Lk] in tiles of bq x bk, with `sub` sub-tiles per side (1: none)."""
    masked, full = classify(block_extremes(q_pos, bq), block_extremes(kv_pos, bk), causal,
                            window)
    if sub == 1:
        return masked, full, np.zeros_like(masked)
    whole = lambda pos, block: -(-pos.shape[-1] // block) * block  # the tiles' padded length
    sm, sf = classify(block_extremes(q_pos, bq // sub, whole(q_pos, bq)),
                      block_extremes(kv_pos, bk // sub, whole(kv_pos, bk)), causal, window)
    skip = ~(sm | sf)
    skip = skip.reshape(skip.shape[:-2] + (masked.shape[-2], sub, masked.shape[-1], sub))
    above = np.triu(np.ones((sub, sub), bool), 1)[:, None, :]  # (a, ., c): c > a
    stair = masked & np.where(above, skip, True).all(axis=(-3, -1))
    return masked & ~stair, full, stair


def sub_tiles(p):
    """Sub-tiles per side of the problem's STAIRCASE tiles (`blockwise.sub_tiles`; 1 when
    the local kernel is not blockwise)."""
    local = registry.local_kernel(p.kernel if p.one_device else None)
    return blockwise.sub_tiles(*p.blocks()) if local.name == "blockwise" else 1


@functools.lru_cache(maxsize=256)
def tile_counts(p):
    """(masked, full, staircase) int64 [steps, n]: tiles of each kind rank r computes at
    ring step s.

    Ring: step s pairs rank r's queries with rank (r - s) mod n's keys, and a
    fully masked shard pair computes nothing. All-gather: one step against all
    keys in layout order. Blockwise: one device, one step. All-to-all: one
    step, every device the whole gathered sequence (of its own heads).
    All-to-all then ring: the ring's counts on the problem after the
    all-to-all, the same for each of the all-to-all axis's devices.
    """
    if p.comm == "alltoall+ring":
        return tuple(np.repeat(x, p.a2a_degree, 1) for x in tile_counts(p.after_all_to_all()))
    n = 1 if p.one_device else p.devices
    bq, bk = p.blocks()
    tiles = lambda q_pos, kv_pos: kinds(q_pos, kv_pos, bq, bk, sub_tiles(p), p.causal,
                                        p.window)
    if p.comm == "alltoall":
        pos = gathered_positions(p)
        ones = np.ones((1, n), np.int64)
        return tuple(x.sum() * ones for x in tiles(pos, pos))
    pos = shard_positions(p.seq_len, p.layout, n, p.stripe)
    if p.comm == "allgather":
        return tuple(x.sum((-1, -2))[None] for x in tiles(pos, pos.reshape(1, -1)))
    sx = block_extremes(pos, pos.shape[1])  # one block per shard
    steps = p.ring_steps() if p.comm == "ring" else 1
    counts = np.zeros((3, steps, n), np.int64)
    for s in range(steps):
        rolled = np.roll(pos, s, axis=0)  # rolled[r] = pos[(r - s) mod n]
        roll = lambda x: np.roll(x, s, axis=0)
        sm, sf = classify(sx, (roll(sx[0]), roll(sx[1]), sx[2]), p.causal, p.window)
        runs = (sm | sf)[:, 0, 0]
        counts[:, s] = [x.sum((-1, -2)) * runs for x in tiles(pos, rolled)]
    return tuple(counts)
