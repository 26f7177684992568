"""Attention masks, described by positions and segment ids, never stored at T x S.

Dimension legend: B batch, T query length, S key/value length, n number of
blocks along a length.

A mask is the conjunction of
  causal:     q_pos >= kv_pos
  window w:   q_pos - kv_pos < w             (only with causal)
  segments:   q_seg == kv_seg                (packed documents)
Every kernel asks two questions of it: "which (query, key) pairs of this small
tile are visible?" (`visible`) and "is a whole block pair invisible, fully
visible, or mixed?" (`classify_blocks`). The second is answered from per-block
minima and maxima, so a block is skipped without building its mask.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp

# Kinds of block pair, used as `lax.switch` branch indices. STAIRCASE: a MASKED
# tile whose sub-tiles above its diagonal are all SKIP (a causal diagonal), so
# a kernel may compute only the sub-tiles on and below it.
SKIP, MASKED, FULL, STAIRCASE = 0, 1, 2, 3

_BIG = jnp.iinfo(jnp.int32).max // 2


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The static half of a mask: what kind of constraint applies."""

    causal: bool = False
    window: int | None = None
    segments: bool = False


class MaskArrays(NamedTuple):
    """The dynamic half: int32 positions [B, T] / [B, S], segment ids or None."""

    q_pos: jnp.ndarray
    kv_pos: jnp.ndarray
    q_seg: jnp.ndarray | None
    kv_seg: jnp.ndarray | None


def make_mask_arrays(batch, q_len, kv_len, *, positions=None, kv_positions=None,
                     segment_ids=None, kv_segment_ids=None) -> MaskArrays:
    """Broadcasts defaults: positions arange(len), kv_segment_ids = segment_ids."""

    def pos(p, length):
        if p is None:
            p = jnp.arange(length, dtype=jnp.int32)
        p = jnp.asarray(p).astype(jnp.int32)
        return jnp.broadcast_to(p, (batch, length))

    if kv_segment_ids is None:
        kv_segment_ids = segment_ids
    q_seg = None if segment_ids is None else jnp.asarray(segment_ids).astype(jnp.int32)
    kv_seg = None if kv_segment_ids is None else jnp.asarray(kv_segment_ids).astype(jnp.int32)
    return MaskArrays(pos(positions, q_len), pos(kv_positions, kv_len), q_seg, kv_seg)


def visible(spec: MaskSpec, q_pos, kv_pos, q_seg=None, kv_seg=None):
    """Boolean [B, T, S]: may query t see key s? Inputs are [B, T] and [B, S]."""
    qp, kp = q_pos[:, :, None], kv_pos[:, None, :]
    ok = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), dtype=bool)
    if spec.causal:
        ok &= qp >= kp
        if spec.window is not None:
            ok &= qp - kp < spec.window
    if spec.segments:
        ok &= q_seg[:, :, None] == kv_seg[:, None, :]
    return ok


class BlockStats(NamedTuple):
    """Per-block extremes over the valid (unpadded) tokens, each [B, n]."""

    pos_min: jnp.ndarray
    pos_max: jnp.ndarray
    seg_min: jnp.ndarray | None
    seg_max: jnp.ndarray | None
    padded: jnp.ndarray  # bool [n]: the block holds padding


def block_stats(pos, seg, block: int, length: int) -> BlockStats:
    """Summarises [B, n * block] (already padded) positions and segment ids."""
    batch, padded_len = pos.shape
    n = padded_len // block
    valid = (jnp.arange(padded_len) < length).reshape(n, block)

    def extremes(x):
        x = x.reshape(batch, n, block)
        lo = jnp.where(valid, x, _BIG).min(-1)
        hi = jnp.where(valid, x, -_BIG).max(-1)
        return lo, hi

    pos_min, pos_max = extremes(pos)
    seg_min, seg_max = extremes(seg) if seg is not None else (None, None)
    return BlockStats(pos_min, pos_max, seg_min, seg_max, ~valid.all(-1))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pad_to(x, length: int, axis: int = 1):
    """x zero-padded along `axis` to `length` (None stays None)."""
    if x is None or x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def classify_tiles(spec: MaskSpec, arrays: MaskArrays, block_q: int, block_k: int,
                   sub_tiles: int = 1):
    """int32 [nq, nk] SKIP / MASKED / FULL of every (query tile, key tile) pair of a call,
    its lengths padded to whole tiles (padding is never visible).

    sub_tiles > 1 (dividing both tiles): a MASKED tile whose s x s sub-tiles above the
    diagonal (query sub-block a, key sub-block c > a) are all SKIP is STAIRCASE.
    """
    q_len, kv_len = arrays.q_pos.shape[1], arrays.kv_pos.shape[1]
    qn, kn = cdiv(q_len, block_q) * block_q, cdiv(kv_len, block_k) * block_k
    stats = lambda block: (
        block_stats(pad_to(arrays.q_pos, qn), pad_to(arrays.q_seg, qn), block, q_len),
        block_stats(pad_to(arrays.kv_pos, kn), pad_to(arrays.kv_seg, kn),
                    block * block_k // block_q, kv_len))
    kinds = classify_blocks(spec, *stats(block_q))
    if sub_tiles == 1:
        return kinds
    nq, nk = kinds.shape
    sub = classify_blocks(spec, *stats(block_q // sub_tiles)).reshape(
        nq, sub_tiles, nk, sub_tiles)
    above = jnp.triu(jnp.ones((sub_tiles, sub_tiles), bool), 1)[None, :, None, :]
    empty = jnp.where(above, sub == SKIP, True).all(axis=(1, 3))
    return jnp.where((kinds == MASKED) & empty, STAIRCASE, kinds).astype(jnp.int32)


def classify_blocks(spec: MaskSpec, q: BlockStats, kv: BlockStats):
    """int32 [nq, nk] of SKIP / MASKED / FULL for every (query, key) block pair.

    Conservative in one direction only: SKIP and FULL are exact claims about
    every (query, key) pair of the block for every batch element; anything
    uncertain is MASKED, which builds the exact mask.
    """
    qmin, qmax = q.pos_min[:, :, None], q.pos_max[:, :, None]
    kmin, kmax = kv.pos_min[:, None, :], kv.pos_max[:, None, :]
    none = jnp.zeros(jnp.broadcast_shapes(qmin.shape, kmin.shape), dtype=bool)
    every = jnp.ones_like(none)
    if spec.causal:
        none |= qmax < kmin
        every &= qmin >= kmax
        if spec.window is not None:
            none |= qmin - kmax >= spec.window
            every &= qmax - kmin < spec.window
    if spec.segments:
        qsmin, qsmax = q.seg_min[:, :, None], q.seg_max[:, :, None]
        ksmin, ksmax = kv.seg_min[:, None, :], kv.seg_max[:, None, :]
        none |= (qsmax < ksmin) | (ksmax < qsmin)
        every &= (qsmin == qsmax) & (ksmin == ksmax) & (qsmin == ksmin)
    skip = none.all(0)
    full = every.all(0) & ~kv.padded[None, :]
    return jnp.where(skip, SKIP, jnp.where(full, FULL, MASKED)).astype(jnp.int32)
