"""Splash attention (jax's Pallas TPU kernel) as a local kernel.

Dimension legend: B batch, T query length, S key/value length (the tokens
this device holds, or has gathered), H query heads, K kv heads, D head_dim.

Splash (`jax.experimental.pallas.ops.tpu.splash_attention`, shipped with jax)
takes its causal structure as a *static* mask, processed into a block
schedule before tracing, while lca's masks follow positions known only at
run time. The two meet through `local.Placement`: a strategy that knows its
layout names the (query positions, key positions) pairs a call may see, and
for each pair this module builds the splash mask in index space:

  keys sorted by position (a static permutation, the identity for a shard),
  query i sees sorted keys lo[i] <= j < hi[i]   (causal: lo = 0; window w:
  lo counts the keys at or before q - w).

Equal masks share one splash kernel, so a ring over 8 shards compiles two
(contiguous: the diagonal and a full pair) to four of them. At run time the
call's positions are compared with every candidate (O(T + S)), and
`lax.switch` runs the matching kernel; positions that match none (on one
device, positions other than the natural order; under a strategy, a caller's
own) run lca's blockwise kernel: exact, but not splash (`branch` tells which runs; a host callback to say so at run time
would not lower for export).
Bidirectional attention needs no placement: one FullMask kernel.

Segment ids reach splash as `SegmentIds(q, kv)`, per batch row, so they
travel with K/V. Grouped-query heads are native (no repeat). Splash does not
scale logits, so q is scaled first and dq by the same factor. The forward
runs with residuals for the float32 log-sum-exp; the backward is splash's
fused dq/dk/dv kernel given the row's global log-sum-exp and lca's delta.
A row that sees no key gets out 0 and lse -inf (splash returns its masked
softmax there). Splash writes the output, dk, dv and its per-key-block dq parts
in the input dtype, so for bfloat16 inputs the protocol's float32 results carry
bfloat16 rounding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from lca.kernels import blockwise, platform
from lca.kernels.local import LocalConfig, LocalKernel, Supports
from lca.kernels.masks import MaskArrays

F32 = jnp.float32
LANES = 128  # splash's tiles are multiples of the TPU's 128 lanes
BLOCKS = (1024, 512, 256, 128)


class _Below(sm._ComputableMask):
    """Row i sees (sorted) keys j < hi[i]: the causal mask function on a shifted q_sequence."""

    def __init__(self, shape, hi):
        super().__init__(shape, lambda q_ids, kv_ids: q_ids >= kv_ids)
        self.q_sequence = np.asarray(hi, np.int32) - 1
        self._key = ("below", shape, self.q_sequence.tobytes())

    def __eq__(self, other):
        return isinstance(other, _Below) and self._key == other._key

    def __hash__(self):
        return hash(self._key)


class _From(sm._ComputableMask):
    """Row i sees (sorted) keys j >= lo[i]."""

    def __init__(self, shape, lo):
        super().__init__(shape, lambda q_ids, kv_ids: q_ids <= kv_ids)
        self.q_sequence = np.asarray(lo, np.int32)
        self._key = ("from", shape, self.q_sequence.tobytes())

    def __eq__(self, other):
        return isinstance(other, _From) and self._key == other._key

    def __hash__(self):
        return hash(self._key)


@dataclasses.dataclass(frozen=True)
class _Branch:
    """One static mask: keys taken in `perm` order (None: as they are), then `mask`
    (None: no key visible)."""

    perm: np.ndarray | None
    mask: sm.Mask | None


@dataclasses.dataclass(frozen=True)
class _Plan:
    q_positions: list          # candidate query positions, int32 [T] each
    kv_positions: list         # candidate key positions, int32 [S] each
    table: np.ndarray          # int32 [len(q_positions), len(kv_positions)] -> branch
    branches: list             # of _Branch
    always: int | None = None  # the branch of every call, whatever its positions


def block(length: int, wanted: int) -> int:
    """The splash tile for a length: the largest of BLOCKS <= wanted dividing it."""
    return next((b for b in BLOCKS if b <= max(wanted, LANES) and length % b == 0), LANES)


def _branch(cfg: LocalConfig, q_pos, kv_pos) -> _Branch:
    """The splash mask of causal (+ window) attention from q_pos to kv_pos (numpy)."""
    t, s = len(q_pos), len(kv_pos)
    perm = np.argsort(kv_pos, kind="stable").astype(np.int32)
    sorted_pos = kv_pos[perm]
    hi = np.searchsorted(sorted_pos, q_pos, side="right")
    lo = (np.zeros(t, np.int64) if cfg.spec.window is None else
          np.searchsorted(sorted_pos, q_pos - cfg.spec.window, side="right"))
    if (hi <= lo).all():
        return _Branch(None, None)
    if (lo == 0).all() and (hi == s).all():
        return _Branch(None, sm.FullMask((t, s)))
    perm = None if (perm == np.arange(s)).all() else perm
    mask = _Below((t, s), hi)
    if cfg.spec.window is not None and (lo > 0).any():
        mask = sm.LogicalAnd(mask, _From((t, s), lo))
    return _Branch(perm, mask)


@functools.lru_cache(maxsize=64)
def _plan(cfg: LocalConfig, q_len: int, kv_len: int) -> _Plan:
    if not cfg.spec.causal:
        full = _Branch(None, sm.FullMask((q_len, kv_len)))
        return _Plan([], [], np.zeros((0, 0), np.int32), [full], always=0)
    q_cands, kv_cands = cfg.placement.candidates()
    q_cands = [p for p in q_cands if len(p) == q_len]
    kv_cands = [p for p in kv_cands if len(p) == kv_len]
    keys, branches = {}, []
    table = np.zeros((len(q_cands), len(kv_cands)), np.int32)
    for a, qp in enumerate(q_cands):
        for b, kp in enumerate(kv_cands):
            br = _branch(cfg, qp, kp)
            key = (None if br.perm is None else br.perm.tobytes(), br.mask)
            if key not in keys:
                keys[key] = len(branches)
                branches.append(br)
            table[a, b] = keys[key]
    return _Plan(q_cands, kv_cands, table, branches)


@functools.lru_cache(maxsize=64)
def _splash(mask: sm.Mask, heads: int, bq: int, bkv: int, interpret: bool):
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                          block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                          use_fused_bwd_kernel=True)
    with jax.ensure_compile_time_eval(), jax.enable_x64(False):  # concrete, cacheable
        return sk.make_splash_mha(sm.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                  save_residuals=True, head_shards=1, q_seq_shards=1,
                                  interpret=interpret), sizes


def _select(plan: _Plan, arrays: MaskArrays):
    """int32 branch index for these positions; len(plan.branches) (blockwise) if none fits."""
    if plan.always is not None:
        return jnp.int32(plan.always)
    if not plan.q_positions or not plan.kv_positions:  # no candidate has these lengths
        return jnp.int32(len(plan.branches))
    hit = lambda pos, cands: jnp.stack([jnp.all(pos == jnp.asarray(c)) for c in cands])
    q_hit, kv_hit = hit(arrays.q_pos, plan.q_positions), hit(arrays.kv_pos, plan.kv_positions)
    index = jnp.asarray(plan.table)[jnp.argmax(q_hit), jnp.argmax(kv_hit)]
    return jnp.where(q_hit.any() & kv_hit.any(), index, len(plan.branches)).astype(jnp.int32)


def _heads_first(x):
    return jnp.swapaxes(x, 1, 2)  # [B, L, H, D] <-> [B, H, L, D]


def _prepare(cfg: LocalConfig, q, k, v, arrays: MaskArrays):
    if cfg.spec.causal and cfg.placement is None:
        raise ValueError(
            "local kernel 'splash' builds its causal masks before tracing, from where the"
            " tokens come from: pass placement=local.Placement(...) to the strategy, or call"
            " it through lca.attention or lca.sequence_parallel_attention, which do; for"
            " positions known only at run time use 'blockwise' or 'pallas_gpu'")
    t, s = q.shape[1], k.shape[1]
    plan = _plan(cfg, t, s)
    bq, bkv = block(t, cfg.block_q), block(s, cfg.block_k)
    qs = _heads_first((q.astype(F32) * cfg.scale).astype(q.dtype))
    return plan, bq, bkv, qs, _heads_first(k), _heads_first(v)


def _take(x, perm, axis):
    return x if perm is None or x is None else jnp.take(x, jnp.asarray(perm), axis=axis)


def _segments(arrays, perm):
    if arrays.q_seg is None:
        return None
    return sk.SegmentIds(q=arrays.q_seg, kv=_take(arrays.kv_seg, perm, 1))


def _unseen(lse):
    """Rows splash filled with its finite mask value: they saw no key."""
    return ~(lse > 0.5 * sk.DEFAULT_MASK_VALUE)


def forward(cfg: LocalConfig, q, k, v, arrays: MaskArrays):
    """Output [B, T, H, D] float32 and log-sum-exp [B, T, H] float32 (-inf: no key seen)."""
    plan, bq, bkv, qs, ks, vs = _prepare(cfg, q, k, v, arrays)
    interp = platform.interpret("splash", KERNEL.platform)
    b, h, t, d = qs.shape

    def run(branch):
        def go():
            if branch.mask is None:
                return jnp.zeros((b, h, t, d), F32), jnp.full((b, h, t), -jnp.inf, F32)
            kernel, _ = _splash(branch.mask, h, bq, bkv, interp)
            seg = _segments(arrays, branch.perm)
            with jax.enable_x64(False):
                out, (lse,) = jax.vmap(lambda *a: kernel(*a[:3], segment_ids=a[3]))(
                    qs, _take(ks, branch.perm, 2), _take(vs, branch.perm, 2), seg)
            unseen = _unseen(lse)
            return (jnp.where(unseen[..., None], 0.0, out.astype(F32)),
                    jnp.where(unseen, -jnp.inf, lse.astype(F32)))
        return go

    def fallback():
        out, lse = blockwise.forward(cfg, q, k, v, arrays)
        return _heads_first(out.astype(F32)), jnp.swapaxes(lse.astype(F32), 1, 2)

    out, lse = lax.switch(_select(plan, arrays), [run(br) for br in plan.branches] + [fallback])
    return _heads_first(out), jnp.swapaxes(lse, 1, 2)


def backward(cfg: LocalConfig, q, k, v, arrays: MaskArrays, lse, do, delta):
    """(dq, dk, dv) float32 given the rows' global lse and delta ([B, T, H] float32)."""
    plan, bq, bkv, qs, ks, vs = _prepare(cfg, q, k, v, arrays)
    interp = platform.interpret("splash", KERNEL.platform)
    lse_h = jnp.swapaxes(jnp.where(jnp.isfinite(lse), lse, 0.0).astype(F32), 1, 2)
    delta_h = jnp.swapaxes(delta.astype(F32), 1, 2)
    do_h = _heads_first(do.astype(q.dtype))

    def run(branch):
        def go():
            if branch.mask is None:
                return (jnp.zeros(q.shape, F32), jnp.zeros(k.shape, F32),
                        jnp.zeros(v.shape, F32))
            kernel, sizes = _splash(branch.mask, qs.shape[1], bq, bkv, interp)
            seg = _segments(arrays, branch.perm)

            def one(q1, k1, v1, seg1, lse1, do1, di1):
                dq, dk, dv = sk._splash_attention_bwd_dkv(
                    q1, k1, v1, seg1, None, lse1, do1, di1, bq=bq, bkv=bkv, bkv_compute=bkv,
                    is_mqa=False, mask_info=kernel.dkv_mask_info,
                    mask_value=sk.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
                    use_fused_bwd_kernel=True, q_layout=sizes.q_layout,
                    k_layout=sizes.k_layout, v_layout=sizes.v_layout,
                    mask_function=kernel.kwargs["mask_function"], interpret=interp)
                return dq, dk, dv

            with jax.enable_x64(False):
                dq, dk, dv = jax.vmap(one)(qs, _take(ks, branch.perm, 2),
                                           _take(vs, branch.perm, 2), seg, lse_h, do_h,
                                           delta_h)
            inverse = None if branch.perm is None else np.argsort(branch.perm).astype(np.int32)
            back = lambda x: _heads_first(_take(x.astype(F32), inverse, 2))
            return _heads_first(dq.astype(F32)) * cfg.scale, back(dk), back(dv)
        return go

    def fallback():
        return tuple(g.astype(F32) for g in
                     blockwise.backward(cfg, q, k, v, arrays, lse, do, delta))

    return lax.switch(_select(plan, arrays), [run(br) for br in plan.branches] + [fallback])


KERNEL = LocalKernel(
    "splash", forward, backward, tiles=(512, 512), bench=False, platform="tpu", typed_vma=False,
    supports=Supports(dtypes=("float32", "bfloat16"), length_multiple=LANES),
    doc="jax's splash attention (Pallas TPU): static masks per layout pair, segment ids"
        " native; interpreted off TPU")
