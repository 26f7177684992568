"""Blockwise (flash-style) exact softmax attention on one device.

Dimension legend:
  B batch, T query length, S key/value length, H query heads, K kv heads,
  G = H // K query heads per kv head, D head_dim,
  bq / bk query / key block length, nq / nk number of query / key blocks.

The forward pass walks key blocks with an online softmax; statistics and
accumulators are float32 whatever the input dtype. The backward pass
recomputes every tile from the inputs, the output and the float32
log-sum-exp (on one device `lca.kernels.local.attend` saves only those).
Each (query block, key block) pair is
classified once from per-block position and segment extremes (see
`masks.classify_tiles`): SKIP pairs cost no FLOPs, FULL pairs take the
unmasked path, MASKED pairs build their small [B, bq, bk] mask, and
STAIRCASE pairs (a causal diagonal: the sub-tiles above it are SKIP) compute
only the SUB_TILES (SUB_TILES + 1) / 2 sub-tiles on and below the diagonal. K and V keep
their K heads: the G query heads of a group share one K/V tile in the einsum.

`forward` and `backward` are the local-kernel protocol (`lca.kernels.local`):
every strategy runs them on the tokens a device holds; `KERNEL` is the
registry's entry.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lca.kernels import masks as masks_lib
from lca.kernels import vma
from lca.kernels.local import LocalConfig, LocalKernel
from lca.kernels.masks import MaskArrays

F32 = jnp.float32

# Sub-tiles per tile side of a STAIRCASE tile (a causal diagonal: `masks`): its
# s (s + 1) / 2 sub-tiles on and below the diagonal are computed, (s + 1) / (2 s)
# of the tile's FLOPs (s = 4: 0.625). Used when block_q == block_k and s divides
# them into sub-tiles of at least MIN_SUB_TILE tokens; otherwise the tile is MASKED.
SUB_TILES = 4
MIN_SUB_TILE = 4


def sub_tiles(block_q: int, block_k: int) -> int:
    """The sub-tiles per side a (block_q, block_k) call splits its STAIRCASE tiles into
    (1: none; every such tile stays MASKED)."""
    ok = block_q == block_k and block_q % SUB_TILES == 0 and block_q // SUB_TILES >= MIN_SUB_TILE
    return SUB_TILES if ok else 1


_cdiv, _pad_to = masks_lib.cdiv, masks_lib.pad_to


def _q_blocks(x_BTHD, bq, kv_heads):
    """[B, T, H, D] -> [nq, B, K, G, bq, D], zero-padded to nq * bq."""
    b, t, h, d = x_BTHD.shape
    nq = _cdiv(t, bq)
    x = _pad_to(x_BTHD, nq * bq, 1).reshape(b, nq, bq, kv_heads, h // kv_heads, d)
    return x.transpose(1, 0, 3, 4, 2, 5)


def _from_q_blocks(x, length):
    """[nq, B, K, G, bq, D] -> [B, T, H, D]."""
    nq, b, k, g, bq, d = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, k * g, d)[:, :length]


def _kv_blocks(x_BSKD, bk):
    """[B, S, K, D] -> [nk, B, K, bk, D], zero-padded to nk * bk."""
    b, s, k, d = x_BSKD.shape
    nk = _cdiv(s, bk)
    return _pad_to(x_BSKD, nk * bk, 1).reshape(b, nk, bk, k, d).transpose(1, 0, 3, 2, 4)


def _from_kv_blocks(x, length):
    """[nk, B, K, bk, D] -> [B, S, K, D]."""
    nk, b, k, bk, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nk * bk, k, d)[:, :length]


def _row_blocks(x_BTH, bq, kv_heads, fill=0.0):
    """Per-query statistics [B, T, H] -> [nq, B, K, G, bq]."""
    b, t, h = x_BTH.shape
    nq = _cdiv(t, bq)
    x = jnp.pad(x_BTH, ((0, 0), (0, nq * bq - t), (0, 0)), constant_values=fill)
    return x.reshape(b, nq, bq, kv_heads, h // kv_heads).transpose(1, 0, 3, 4, 2)


def _from_row_blocks(x, length):
    """[nq, B, K, G, bq] -> [B, T, H]."""
    nq, b, k, g, bq = x.shape
    return x.transpose(1, 0, 4, 2, 3).reshape(b, nq * bq, k * g)[:, :length]


def _len_blocks(x_BT, block):
    """[B, T] ids -> [n, B, block] (None stays None)."""
    if x_BT is None:
        return None
    b, t = x_BT.shape
    n = _cdiv(t, block)
    return _pad_to(x_BT, n * block, 1).reshape(b, n, block).transpose(1, 0, 2)


class _Tiles:
    """Blocked views of one call's inputs and its block-pair classification."""

    def __init__(self, cfg: LocalConfig, q, k, v, arrays: MaskArrays):
        self.cfg = cfg
        self.q_len, self.kv_len = q.shape[1], k.shape[1]
        self.kv_heads = k.shape[2]
        bq, bk = cfg.block_q, cfg.block_k
        self.nq, self.nk = _cdiv(self.q_len, bq), _cdiv(self.kv_len, bk)
        self.q = _q_blocks(q, bq, self.kv_heads)
        self.k = _kv_blocks(k, bk)
        self.v = _kv_blocks(v, bk)
        self.q_pos, self.q_seg = _len_blocks(arrays.q_pos, bq), _len_blocks(arrays.q_seg, bq)
        self.kv_pos, self.kv_seg = _len_blocks(arrays.kv_pos, bk), _len_blocks(arrays.kv_seg, bk)
        self.kv_valid = (jnp.arange(self.nk * bk) < self.kv_len).reshape(self.nk, bk)
        self.sub_tiles = sub_tiles(bq, bk)
        self.kinds = masks_lib.classify_tiles(cfg.spec, arrays, bq, bk, self.sub_tiles)

    def mask(self, i, j):
        """Bool [B, 1, 1, bq, bk] for query block i and key block j."""
        seg = lambda x, n: None if x is None else x[n]
        ok = masks_lib.visible(self.cfg.spec, self.q_pos[i], self.kv_pos[j],
                               seg(self.q_seg, i), seg(self.kv_seg, j))
        return (ok & self.kv_valid[j][None, None, :])[:, None, None]

    def logits(self, q_i, k_j):
        """Scaled float32 logits [B, K, G, bq, bk]."""
        s = jnp.einsum("bkgqd,bksd->bkgqs", q_i, k_j, preferred_element_type=F32)
        return s * self.cfg.scale


def forward(cfg: LocalConfig, q, k, v, arrays: MaskArrays):
    """Output [B, T, H, D] float32 and log-sum-exp [B, T, H] float32.

    A query that sees no key gets output 0 and log-sum-exp -inf.
    """
    tiles = _Tiles(cfg, q, k, v, arrays)
    b, _, h, d = q.shape
    kh = tiles.kv_heads
    stat_shape = (b, kh, h // kh, cfg.block_q)

    def one_q_block(i):
        q_i = tiles.q[i]

        def update(carry, q, k_j, v_j, mask):
            acc, m, l = carry
            s = tiles.logits(q, k_j)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v_j,
                            preferred_element_type=F32)
            return alpha[..., None] * acc + pv, m_new, alpha * l + p.sum(-1)

        def staircase(carry, j):
            """Query sub-block a against key sub-blocks 0..a only."""
            n = tiles.sub_tiles
            u = cfg.block_q // n
            mask = tiles.mask(i, j)
            rows = []
            for a in range(n):
                r, w = slice(a * u, (a + 1) * u), (a + 1) * u
                part = tuple(x[..., r, :] if x.ndim == 5 else x[..., r] for x in carry)
                rows.append(update(part, q_i[..., r, :], tiles.k[j][:, :, :w],
                                   tiles.v[j][:, :, :w], mask[..., r, :w]))
            return tuple(jnp.concatenate(xs, axis=-2 if xs[0].ndim == 5 else -1)
                         for xs in zip(*rows))

        def step(carry, j):
            branches = (lambda c: c,
                        lambda c: update(c, q_i, tiles.k[j], tiles.v[j], tiles.mask(i, j)),
                        lambda c: update(c, q_i, tiles.k[j], tiles.v[j], None),
                        lambda c: staircase(c, j))
            return lax.switch(tiles.kinds[i, j], branches[:3 + (tiles.sub_tiles > 1)],
                              carry), None

        init = vma.like((jnp.zeros(stat_shape + (d,), F32),
                         jnp.full(stat_shape, -jnp.inf, F32),
                         jnp.zeros(stat_shape, F32)), q, k, v, arrays)
        (acc, m, l), _ = lax.scan(step, init, jnp.arange(tiles.nk))
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        return acc / l_safe[..., None], jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)

    o, lse = lax.map(one_q_block, jnp.arange(tiles.nq))
    return _from_q_blocks(o, tiles.q_len), _from_row_blocks(lse, tiles.q_len)


def backward(cfg: LocalConfig, q, k, v, arrays: MaskArrays, lse, do, delta):
    """Gradients (dq, dk, dv), float32, of the attention output.

    Args:
      lse: [B, T, H] float32 log-sum-exp of the full attention row (for a ring
        step, of all key shards, not just this one).
      do: [B, T, H, D] output cotangent.
      delta: [B, T, H] float32, rowsum(do * out) minus the log-sum-exp cotangent.
    """
    tiles = _Tiles(cfg, q, k, v, arrays)
    kh = tiles.kv_heads
    inputs = (q, k, v, arrays, lse, do, delta)  # zeros vary with these under shard_map
    # A row that saw no key has lse -inf and all its logits masked to -inf;
    # any finite stand-in gives p = 0 there without NaN.
    lse_rows = _row_blocks(jnp.where(jnp.isfinite(lse), lse, 0.0), cfg.block_q, kh)
    delta_rows = _row_blocks(delta.astype(F32), cfg.block_q, kh)
    do_blocks = _q_blocks(do, cfg.block_q, kh)

    b, _, h, d = q.shape
    g, bq = h // kh, cfg.block_q
    # Tiles are computed transposed, keys by queries ([B, K, bk, G * bq]): dK and
    # dV then contract the tile's minor axis with no [bk, bq] transpose, and dQ
    # is accumulated transposed ([B, K, D, G * bq]) for the same reason.
    def tile_grads(k, v, q, do_, lse_r, delta_r, mask):
        """One (sub-)tile: q, do [B, K, G, r, D], lse and delta [B, K, G, r], k, v
        [B, K, c, D], mask [B, 1, 1, r, c] or None -> dK, dV [B, K, c, D] and the
        transposed dQ [B, K, D, G, r], float32."""
        r = q.shape[3]
        rows = lambda x: x.reshape(x.shape[:2] + (g * r,) + x.shape[4:])
        q, do_ = rows(q), rows(do_)
        s_t = jnp.einsum("bksd,bkqd->bksq", k, q, preferred_element_type=F32) * cfg.scale
        if mask is not None:
            mask = jnp.swapaxes(mask[:, :, 0], -1, -2)[:, :, :, None, :]
            mask = jnp.broadcast_to(mask, mask.shape[:3] + (g, r)).reshape(
                mask.shape[:3] + (g * r,))
            s_t = jnp.where(mask, s_t, -jnp.inf)
        p_t = jnp.exp(s_t - rows(lse_r)[:, :, None, :])
        dv = jnp.einsum("bksq,bkqd->bksd", p_t.astype(do.dtype), do_,
                        preferred_element_type=F32)
        dp_t = jnp.einsum("bksd,bkqd->bksq", v, do_, preferred_element_type=F32)
        ds_t = (p_t * (dp_t - rows(delta_r)[:, :, None, :])).astype(q.dtype)
        dk = jnp.einsum("bksq,bkqd->bksd", ds_t, q, preferred_element_type=F32)
        dq = jnp.einsum("bksd,bksq->bkdq", k, ds_t, preferred_element_type=F32)
        return dk, dv, dq.reshape(dq.shape[:3] + (g, r))

    def one_k_block(dq_t, j):
        k_j, v_j = tiles.k[j], tiles.v[j]

        def grads(carry, i, masked):
            dk, dv = carry
            mask = tiles.mask(i, j) if masked else None
            dk_i, dv_i, dq_i = tile_grads(k_j, v_j, tiles.q[i], do_blocks[i], lse_rows[i],
                                          delta_rows[i], mask)
            return (dk + dk_i, dv + dv_i), dq_i.reshape(dq_i.shape[:3] + (g * bq,))

        def staircase(carry, i):
            """Key sub-block c against query sub-blocks c.. only."""
            dk, dv = carry
            n = tiles.sub_tiles
            u = bq // n
            mask = tiles.mask(i, j)
            dks, dvs, dq_i = [], [], 0.0
            for c in range(n):
                cols, lo = slice(c * u, (c + 1) * u), c * u
                dk_c, dv_c, dq_c = tile_grads(
                    k_j[:, :, cols], v_j[:, :, cols], tiles.q[i][..., lo:, :],
                    do_blocks[i][..., lo:, :], lse_rows[i][..., lo:], delta_rows[i][..., lo:],
                    mask[..., lo:, cols])
                dks.append(dk_c)
                dvs.append(dv_c)
                dq_i = dq_i + jnp.pad(dq_c, [(0, 0)] * 4 + [(lo, 0)])
            return ((dk + jnp.concatenate(dks, axis=2), dv + jnp.concatenate(dvs, axis=2)),
                    dq_i.reshape(dq_i.shape[:3] + (g * bq,)))

        # The branches return the tile's dQ and the update happens outside them:
        # a conditional that carried the whole [nq, ...] dQ buffer would copy it
        # at every tile pair (O(T) bytes per tile, O(T^3) in all).
        def step(carry, i):
            dq_t, kv = carry
            branches = (lambda c: (c, vma.like(jnp.zeros(dq_t.shape[1:], F32), *inputs)),
                        lambda c: grads(c, i, masked=True),
                        lambda c: grads(c, i, masked=False),
                        lambda c: staircase(c, i))
            kv, dq_i = lax.switch(tiles.kinds[i, j], branches[:3 + (tiles.sub_tiles > 1)], kv)
            return (dq_t.at[i].add(dq_i), kv), None

        kv_zeros = vma.like(jnp.zeros(k_j.shape, F32), *inputs)
        (dq_t, (dk, dv)), _ = lax.scan(step, (dq_t, (kv_zeros, kv_zeros)), jnp.arange(tiles.nq))
        return dq_t, (dk * cfg.scale, dv)

    dq0 = vma.like(jnp.zeros((tiles.nq, b, kh, d, g * bq), F32), *inputs)
    dq_t, (dk, dv) = lax.scan(one_k_block, dq0, jnp.arange(tiles.nk))
    dq = dq_t.reshape(tiles.nq, b, kh, d, g, bq).transpose(0, 1, 2, 4, 5, 3) * cfg.scale
    return (_from_q_blocks(dq, tiles.q_len),
            _from_kv_blocks(dk, tiles.kv_len),
            _from_kv_blocks(dv, tiles.kv_len))


KERNEL = LocalKernel(
    "blockwise", forward, backward,
    doc="online-softmax tiles; fully masked tiles skipped, fully visible ones unmasked")
