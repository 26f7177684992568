"""Which tiles each device computes, per ring step: the cost model's tile counts (NumPy).

`tools/cost_model.py` multiplies these by a tile's FLOPs. The rules mirror
the kernels: a shard pair is classified from its position extremes (a fully
masked pair runs nothing, `ring.shard_pair_kind`), and every (bq x bk) tile
of a pair that runs is SKIP / MASKED / FULL by the per-block min/max rule of
`masks.classify_blocks`. `tests/test_cost_model.py` checks the counts
against the kernels' own classification and the compiled HLO.
"""

import functools

import numpy as np

from lca import layouts
from lca.kernels import registry


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


def block_extremes(pos, block):
    """(min, max, padded) per block of the last axis; padding excluded, as masks.block_stats."""
    length = pos.shape[-1]
    nb = -(-length // block)
    pad = nb * block - length
    widths = [(0, 0)] * (pos.ndim - 1) + [(0, pad)]
    lo = np.pad(pos, widths, constant_values=np.iinfo(np.int64).max)
    hi = np.pad(pos, widths, constant_values=np.iinfo(np.int64).min)
    shape = pos.shape[:-1] + (nb, block)
    padded = np.zeros(nb, bool)
    padded[-1] = pad > 0
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


@functools.lru_cache(maxsize=256)
def tile_counts(p):
    """(masked, full) int64 [steps, n]: tiles of each kind rank r computes at ring step s.

    Ring: step s pairs rank r's queries with rank (r - s) mod n's keys, and a
    fully masked shard pair computes nothing. All-gather: one step against all
    keys in layout order. Blockwise: one device, one step. All-to-all: one
    step, every device the whole gathered sequence (of its own heads).
    All-to-all then ring: the ring's counts on the problem after the
    all-to-all, the same for each of the all-to-all axis's devices.
    """
    if p.comm == "alltoall+ring":
        masked, full = tile_counts(p.after_all_to_all())
        return np.repeat(masked, p.a2a_degree, 1), np.repeat(full, p.a2a_degree, 1)
    n = 1 if p.one_device else p.devices
    bq, bk = p.blocks()
    if p.comm == "alltoall":
        pos = gathered_positions(p)
        masked, full = classify(block_extremes(pos, bq), block_extremes(pos, bk), p.causal,
                                p.window)
        ones = np.ones((1, n), np.int64)
        return masked.sum() * ones, full.sum() * ones
    pos = shard_positions(p.seq_len, p.layout, n, p.stripe)
    qx = block_extremes(pos, bq)
    if p.comm == "allgather":
        kx = block_extremes(pos.reshape(1, -1), bk)
        masked, full = classify(qx, kx, p.causal, p.window)
        return masked.sum((-1, -2))[None], full.sum((-1, -2))[None]
    kx = block_extremes(pos, bk)
    sx = block_extremes(pos, pos.shape[1])  # one block per shard
    steps = p.ring_steps() if p.comm == "ring" else 1
    masked, full = np.zeros((steps, n), np.int64), np.zeros((steps, n), np.int64)
    for s in range(steps):
        roll = lambda x: np.roll(x, s, axis=0)  # roll(x)[r] = x[(r - s) mod n]
        m, f = classify(qx, (roll(kx[0]), roll(kx[1]), kx[2]), p.causal, p.window)
        sm, sf = classify(sx, (roll(sx[0]), roll(sx[1]), sx[2]), p.causal, p.window)
        runs = (sm | sf)[:, 0, 0]
        masked[s], full[s] = m.sum((-1, -2)) * runs, f.sum((-1, -2)) * runs
    return masked, full
