"""Flash attention as Pallas GPU (Triton) kernels: the local-kernel protocol on a GPU.

Dimension legend:
  B batch, T query length, S key/value length, H query heads, K kv heads,
  G = H // K query heads per kv head, D head_dim,
  bq / bk query / key tile length, nq / nk number of query / key tiles,
  Tp = nq * bq, Sp = nk * bk the lengths padded to whole tiles.

Three `pl.pallas_call`s, written for the Triton backend:
  forward  grid (B, K, nq): a program holds the G x bq query rows of one kv
           head group and walks the key tiles with an online softmax;
  dq       grid (B, K, nq): the same rows, walking the key tiles;
  dk / dv  grid (B, K, nk): one K/V tile, walking the query tiles.
The G query heads of a group share each loaded K/V tile (K/V keep their K
heads; nothing is repeated in memory). Each (query tile, key tile) pair is
classified once, outside the kernels, from position and segment extremes
(`masks.classify_blocks`, exactly as `blockwise` does; `tile_schedule` returns
it). Inside, a SKIP pair loads nothing and computes nothing, a FULL pair takes
the unmasked path and a MASKED pair builds its [bq, bk] mask from the tiles'
positions and (separate) query / key segment ids. Statistics, accumulators and
every dot's result are float32; the dots' inputs stay in the input dtype. A
forward / dq program keeps G x bq rows of float32 accumulators live: with many
query heads per kv head, pass a smaller block_q (the tiles are untuned).

Lengths are padded to whole tiles (padded keys masked, padded query rows
dropped). Triton wants power-of-two tensors and `tl.dot` wants every side
>= 16, so tiles are powers of two >= 16 (a tile that covers a whole shorter
length is rounded up to one) and head_dim is one of HEAD_DIMS; `plan` raises
a ValueError naming what works before anything is traced.

Off a GPU the kernels run in Pallas' interpret mode (exact, slow: for tests),
chosen by `interpret_mode()` (`lca.kernels.platform`); inside
`platform.lowering_for("gpu")` they lower for Triton on any machine, e.g. to
`jax.export(..., platforms=["cuda"])` from a CPU host. Interpret mode cannot
trace under `jax.shard_map(check_vma=True)`, so strategies run this kernel
with check_vma=False (`KERNEL.typed_vma`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lca.kernels import masks as masks_lib
from lca.kernels import platform, vma
from lca.kernels.local import LocalConfig, LocalKernel, Supports
from lca.kernels.masks import MaskArrays, MaskSpec

F32 = jnp.float32
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = ("float32", "bfloat16")
MIN_BLOCK = 16  # tl.dot's smallest M, N and K


def interpret_mode() -> bool:
    """Whether the kernels run interpreted: off a GPU backend, unless inside
    `platform.lowering_for("gpu")`; the first interpreted call warns once."""
    return platform.interpret("pallas_gpu", "gpu")


# --- tiles and checks -----------------------------------------------------------------------

def _pow2(n):
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _tile(name, block, length):
    """The tile length used for `block` over `length`, or a ValueError naming what works."""
    if block >= length:  # one tile covers the whole length: round it up, pad
        return max(MIN_BLOCK, _next_pow2(length))
    if block < MIN_BLOCK:
        raise ValueError(f"{name} {block} is below {MIN_BLOCK}: pallas_gpu tiles are powers of"
                         f" two >= {MIN_BLOCK} (tl.dot's minimum); use {MIN_BLOCK} or more")
    if not _pow2(block):
        lo = 1 << (block.bit_length() - 1)
        raise ValueError(f"{name} {block} is not a power of two: pallas_gpu (Triton) tiles are"
                         f" powers of two; use {lo} or {2 * lo}")
    return block


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static tiling of one call: tile lengths, tile counts, true and padded lengths."""

    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    nq: int
    nk: int
    kv_heads: int
    groups: int

    @property
    def q_pad(self):
        return self.nq * self.block_q

    @property
    def kv_pad(self):
        return self.nk * self.block_k


def plan(cfg: LocalConfig, q, k) -> Plan:
    """Checks a call's shapes and dtypes (a ValueError naming what works) and tiles it.

    q: [B, T, H, D]; k: [B, S, K, D]; float32 or bfloat16, H % K == 0.
    """
    dtype, k_dtype = np.dtype(q.dtype).name, np.dtype(k.dtype).name
    if dtype not in DTYPES or k_dtype != dtype:
        got = dtype if k_dtype == dtype else f"q {dtype}, k {k_dtype}"
        raise ValueError(f"dtype {got}: pallas_gpu takes q, k and v all float32 or all"
                         " bfloat16")
    (_, t, h, d), (_, s, kh, _) = q.shape, k.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim {d}: pallas_gpu takes head_dim in {set(HEAD_DIMS)}")
    if h % kh:
        raise ValueError(f"q heads ({h}) must be a multiple of kv_heads ({kh})")
    bq = _tile("block_q", cfg.block_q, t)
    bk = _tile("block_k", cfg.block_k, s)
    return Plan(bq, bk, t, s, _cdiv(t, bq), _cdiv(s, bk), kh, h // kh)


_cdiv, _pad_to = masks_lib.cdiv, masks_lib.pad_to


def _kinds(spec: MaskSpec, p: Plan, arrays: MaskArrays):
    """int32 [nq, nk] SKIP / MASKED / FULL of every tile pair, exactly as blockwise's."""
    return masks_lib.classify_tiles(spec, arrays, p.block_q, p.block_k)


def tile_schedule(cfg: LocalConfig, q, k, arrays: MaskArrays):
    """int32 [nq, nk]: the kinds (masks.SKIP / MASKED / FULL) the kernels run per tile pair.

    Every non-SKIP pair loads one K/V tile (and its positions) per program and
    costs the G x bq x bk x D dots; a SKIP pair costs neither.
    """
    return _kinds(cfg.spec, plan(cfg, q, k), arrays)


# --- in-kernel pieces -----------------------------------------------------------------------

def _dot_nt(a, b):
    """a [m, d] @ b [n, d]^T -> float32 [m, n]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _dot_nn(a, b):
    """a [m, n] @ b [n, d] -> float32 [m, d]."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _dot_tn(a, b):
    """a [m, n]^T @ b [m, d] -> float32 [n, d]."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def _tile_mask(spec, kv_len, q_pos, kv_pos, q_seg, kv_seg, kv_start):
    """Bool [bq, bk]: visible pairs of one MASKED tile (masks.visible), padded keys hidden."""
    seg = lambda x: None if x is None else x[None]
    ok = masks_lib.visible(spec, q_pos[None], kv_pos[None], seg(q_seg), seg(kv_seg))[0]
    kv_idx = kv_start + lax.broadcasted_iota(jnp.int32, ok.shape, 1)
    return ok & (kv_idx < kv_len)


def _walk(kinds_ref, n, update, init):
    """Folds update(j, carry, masked) over tiles j < n by kind (kinds_ref[j]): SKIP tiles
    pass the carry through untouched (nothing loaded), FULL ones run unmasked."""
    def step(j, carry):
        kind = kinds_ref[j]
        masked = functools.partial(update, j, masked=True)
        full = functools.partial(update, j, masked=False)
        # Nested conds: Triton's scf.if.
        return lax.cond(kind == masks_lib.SKIP, lambda c: c,
                        lambda c: lax.cond(kind == masks_lib.FULL, full, masked, c), carry)

    return lax.fori_loop(0, n, step, init)


def _seg_refs(refs, segments):
    """Splits (..., q_seg, kv_seg, rest...) optional segment refs off a ref list."""
    if segments:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


def _key_tile(j, cfg, p, k_ref, v_ref, kv_pos_ref, kv_seg_ref, q_pos, q_seg, masked):
    """Key tile j: k, v [bk, D] and, for a MASKED tile, its [rows, bk] mask (else None)."""
    keys = pl.ds(j * p.block_k, p.block_k)
    mask = None
    if masked:
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
        mask = _tile_mask(cfg.spec, p.kv_len, q_pos, kv_pos_ref[keys], q_seg, kv_seg,
                          j * p.block_k)
    return k_ref[keys, :], v_ref[keys, :], mask


def _logits(q, k, scale, mask):
    """Scaled float32 logits [rows, bk], -inf where `mask` (if any) hides a key."""
    s = _dot_nt(q, k) * scale
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _forward_kernel(kinds_ref, q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, *refs,
                    cfg: LocalConfig, p: Plan):
    """One program: rows q_ref [bq, G, D] of one kv head against every key tile of it."""
    q_seg_ref, kv_seg_ref, (o_ref, lse_ref) = _seg_refs(refs, cfg.spec.segments)
    d = q_ref.shape[-1]
    qs = [q_ref[:, g, :] for g in range(p.groups)]
    q_pos = q_pos_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def update(j, carry, masked):
        k, v, mask = _key_tile(j, cfg, p, k_ref, v_ref, kv_pos_ref, kv_seg_ref, q_pos, q_seg,
                               masked)
        out = []
        for q, (acc, m, l) in zip(qs, carry):
            s = _logits(q, k, cfg.scale, mask)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            e = jnp.exp(s - m_safe[:, None])
            alpha = jnp.exp(m - m_safe)
            acc = alpha[:, None] * acc + _dot_nn(e.astype(v.dtype), v)
            out.append((acc, m_new, alpha * l + e.sum(-1)))
        return tuple(out)

    rows = q_pos.shape[0]
    init = tuple((jnp.zeros((rows, d), F32), jnp.full((rows,), -jnp.inf, F32),
                  jnp.zeros((rows,), F32)) for _ in range(p.groups))
    carry = _walk(kinds_ref, p.nk, update, init)
    for g, (acc, m, l) in enumerate(carry):
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[:, g, :] = acc / l_safe[:, None]
        lse_ref[:, g] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _dq_kernel(kinds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref,
               kv_pos_ref, *refs, cfg: LocalConfig, p: Plan):
    """One program: dq of rows [bq, G, D] of one kv head, walking its key tiles."""
    q_seg_ref, kv_seg_ref, (dq_ref,) = _seg_refs(refs, cfg.spec.segments)
    d = q_ref.shape[-1]
    heads = [(q_ref[:, g, :], do_ref[:, g, :], lse_ref[:, g], delta_ref[:, g])
             for g in range(p.groups)]
    q_pos = q_pos_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def update(j, carry, masked):
        k, v, mask = _key_tile(j, cfg, p, k_ref, v_ref, kv_pos_ref, kv_seg_ref, q_pos, q_seg,
                               masked)
        out = []
        for (q, do, lse, delta), dq in zip(heads, carry):
            e = jnp.exp(_logits(q, k, cfg.scale, mask) - lse[:, None])
            ds = e * (_dot_nt(do, v) - delta[:, None])
            out.append(dq + _dot_nn(ds.astype(q.dtype), k))
        return tuple(out)

    init = tuple(jnp.zeros((q_pos.shape[0], d), F32) for _ in range(p.groups))
    for g, dq in enumerate(_walk(kinds_ref, p.nk, update, init)):
        dq_ref[:, g, :] = dq * cfg.scale


def _dkv_kernel(kinds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref,
                kv_pos_ref, *refs, cfg: LocalConfig, p: Plan):
    """One program: dk, dv of one K/V tile [bk, D], walking every query tile of its group."""
    q_seg_ref, kv_seg_ref, (dk_ref, dv_ref) = _seg_refs(refs, cfg.spec.segments)
    bq = p.block_q
    k, v = k_ref[...], v_ref[...]
    kv_pos = kv_pos_ref[...]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    kv_start = pl.program_id(2) * p.block_k

    def update(i, carry, masked):
        rows = pl.ds(i * bq, bq)
        dk, dv = carry
        if masked:
            q_seg = None if q_seg_ref is None else q_seg_ref[rows]
            mask = _tile_mask(cfg.spec, p.kv_len, q_pos_ref[rows], kv_pos, q_seg, kv_seg,
                              kv_start)
        else:
            mask = None
        for g in range(p.groups):
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            e = jnp.exp(_logits(q, k, cfg.scale, mask) - lse_ref[rows, g][:, None])
            dv = dv + _dot_tn(e.astype(do.dtype), do)
            ds = e * (_dot_nt(do, v) - delta_ref[rows, g][:, None])
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros(k.shape, F32)
    dk, dv = _walk(kinds_ref, p.nq, update, (zeros, zeros))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


# --- pallas_calls ---------------------------------------------------------------------------

def _compiler_params(p: Plan, d: int):
    rows = p.groups * max(p.block_q, p.block_k)
    return plgpu.CompilerParams(num_warps=4 if rows * d <= 64 * 64 else 8, num_stages=2)


def _specs(p: Plan, d: int, segments: bool, over: str):
    """BlockSpecs of (kinds, q, k, v, [do, lse, delta,] q_pos, kv_pos, [q_seg, kv_seg]).

    over "q": grid (B, K, nq), a program's query rows [bq, G, ...], all keys;
    over "kv": grid (B, K, nk), one key tile [bk, ...], all query rows.
    """
    g, bq, bk = p.groups, p.block_q, p.block_k
    if over == "q":
        kinds = pl.BlockSpec((None, p.nk), lambda b, h, i: (i, 0))
        rows = pl.BlockSpec((None, bq, g, d), lambda b, h, i: (b, i, h, 0))
        stats = pl.BlockSpec((None, bq, g), lambda b, h, i: (b, i, h))
        keys = pl.BlockSpec((None, p.kv_pad, None, d), lambda b, h, i: (b, 0, h, 0))
        q_ids = pl.BlockSpec((None, bq), lambda b, h, i: (b, i))
        kv_ids = pl.BlockSpec((None, p.kv_pad), lambda b, h, i: (b, 0))
    else:
        kinds = pl.BlockSpec((p.nq, None), lambda b, h, j: (0, j))
        rows = pl.BlockSpec((None, p.q_pad, g, d), lambda b, h, j: (b, 0, h, 0))
        stats = pl.BlockSpec((None, p.q_pad, g), lambda b, h, j: (b, 0, h))
        keys = pl.BlockSpec((None, bk, None, d), lambda b, h, j: (b, j, h, 0))
        q_ids = pl.BlockSpec((None, p.q_pad), lambda b, h, j: (b, 0))
        kv_ids = pl.BlockSpec((None, bk), lambda b, h, j: (b, j))
    ids = [q_ids, kv_ids] + ([q_ids, kv_ids] if segments else [])
    return dict(kinds=kinds, rows=rows, stats=stats, keys=keys, ids=ids)


def _prepare(cfg: LocalConfig, q, k, v, arrays: MaskArrays):
    """(plan, tile kinds, q, k, v padded to whole tiles, int32 mask arrays the kernels read)."""
    p = plan(cfg, q, k)
    if not cfg.spec.segments:
        arrays = arrays._replace(q_seg=None, kv_seg=None)
    elif arrays.q_seg is None or arrays.kv_seg is None:
        raise ValueError("a segments mask needs both q and kv segment ids in `arrays`")
    ids = [_pad_to(arrays.q_pos, p.q_pad), _pad_to(arrays.kv_pos, p.kv_pad)]
    if cfg.spec.segments:
        ids += [_pad_to(arrays.q_seg, p.q_pad), _pad_to(arrays.kv_seg, p.kv_pad)]
    return (p, _kinds(cfg.spec, p, arrays), _pad_to(q, p.q_pad), _pad_to(k, p.kv_pad),
            _pad_to(v, p.kv_pad), [x.astype(jnp.int32) for x in ids])


def _varying(*inputs):
    """inputs, all cast to vary over the manual axes any of them does (under `shard_map`),
    and a function giving an output `jax.ShapeDtypeStruct` that varies the same way."""
    inputs = vma.like(inputs, *inputs)
    mat = getattr(jax.typeof(inputs[1]), "manual_axis_type", None)
    return inputs, lambda shape: jax.ShapeDtypeStruct(shape, F32, manual_axis_type=mat)


def forward(cfg: LocalConfig, q, k, v, arrays: MaskArrays):
    """Output [B, T, H, D] float32 and natural-log log-sum-exp [B, T, H] float32.

    q: [B, T, H, D], k / v: [B, S, K, D], float32 or bfloat16; arrays: int32
    positions and segment ids of these tokens. A query that sees no key gets
    output 0 and log-sum-exp -inf.
    """
    p, kinds, qp, kp, vp, ids = _prepare(cfg, q, k, v, arrays)
    b, _, h, d = q.shape
    sp = _specs(p, d, cfg.spec.segments, "q")
    inputs, out_shape = _varying(kinds, qp, kp, vp, *ids)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, p=p),
        out_shape=(out_shape((b, p.q_pad, h, d)), out_shape((b, p.q_pad, h))),
        grid=(b, p.kv_heads, p.nq),
        in_specs=[sp["kinds"], sp["rows"], sp["keys"], sp["keys"], *sp["ids"]],
        out_specs=(sp["rows"], sp["stats"]),
        compiler_params=_compiler_params(p, d),
        interpret=interpret_mode(),
        name="lca_pallas_gpu_forward",
    )(*inputs)
    return out[:, :p.q_len], lse[:, :p.q_len]


def backward(cfg: LocalConfig, q, k, v, arrays: MaskArrays, lse, do, delta):
    """Gradients (dq [B, T, H, D], dk, dv [B, S, K, D]), float32: this K/V's exact parts.

    Args:
      lse: [B, T, H] float32 log-sum-exp of the whole attention row (under a
        ring, over every key shard); -inf for a row that sees no key.
      do: [B, T, H, D] output cotangent (any float dtype; cast to q's).
      delta: [B, T, H] float32, rowsum(do * out) minus the log-sum-exp cotangent.
    """
    p, kinds, qp, kp, vp, ids = _prepare(cfg, q, k, v, arrays)
    b, _, h, d = q.shape
    # A row that saw no key has all its logits masked to -inf: any finite
    # stand-in gives probability 0 there without NaN. Padded rows have do = 0.
    lse = _pad_to(jnp.where(jnp.isfinite(lse), lse, 0.0).astype(F32), p.q_pad)
    delta = _pad_to(delta.astype(F32), p.q_pad)
    dop = _pad_to(do.astype(q.dtype), p.q_pad)
    inputs, out_shape = _varying(kinds, qp, kp, vp, dop, lse, delta, *ids)
    params, mode = _compiler_params(p, d), interpret_mode()

    sq = _specs(p, d, cfg.spec.segments, "q")
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, p=p),
        out_shape=out_shape((b, p.q_pad, h, d)),
        grid=(b, p.kv_heads, p.nq),
        in_specs=[sq["kinds"], sq["rows"], sq["keys"], sq["keys"], sq["rows"], sq["stats"],
                  sq["stats"], *sq["ids"]],
        out_specs=sq["rows"],
        compiler_params=params, interpret=mode, name="lca_pallas_gpu_dq",
    )(*inputs)

    skv = _specs(p, d, cfg.spec.segments, "kv")
    kv_shape = out_shape((b, p.kv_pad, p.kv_heads, d))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, p=p),
        out_shape=(kv_shape, kv_shape),
        grid=(b, p.kv_heads, p.nk),
        in_specs=[skv["kinds"], skv["rows"], skv["keys"], skv["keys"], skv["rows"],
                  skv["stats"], skv["stats"], *skv["ids"]],
        out_specs=(skv["keys"], skv["keys"]),
        compiler_params=params, interpret=mode, name="lca_pallas_gpu_dkv",
    )(*inputs)
    return dq[:, :p.q_len], dk[:, :p.kv_len], dv[:, :p.kv_len]


KERNEL = LocalKernel(
    "pallas_gpu", forward, backward,
    doc="Pallas Triton flash attention (GPU; interpret mode elsewhere): masked tiles skipped,"
        " fully visible ones unmasked, grouped-query heads share K/V tiles",
    supports=Supports(dtypes=DTYPES, head_dims=HEAD_DIMS),
    tiles=(64, 32), bench=False,  # measured by the device part, not the CPU suite
    platform="gpu",
    # Pallas' interpret mode cannot trace under shard_map(check_vma=True).
    typed_vma=False)
