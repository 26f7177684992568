"""The sparse part: hash-bucketed, key-dropping and HyperAttention against dense attention.

    python experiments/bench.py --part sparse [--quick] [--out DIR]

One device, batch 1, head_dim 64, float32, q/k/v standard normal (seeded by
T). Rows are `Point`s with part "sparse"; `baseline` is dense attention
("blockwise", its default 512 tiles) at the same T, mode and heads, and
`vs_baseline` its seconds / the row's (> 1: faster).

  mode "fwd+bwd" (jax.grad of sum(out * w), w standard normal, w.r.t. q, k
  and v; jitted), H = K = 4 heads at `Grid.lengths`, and the GQA set H = 4,
  K = 2 at `Grid.gqa_lengths`:
    blockwise    dense causal attention (`lca.attention`), exact
    bucketed/n   `lca.sparse.bucketed_attention` in n hash buckets: buckets
                 from one angular LSH per kv head (`rotation_for`; a query
                 head hashes with its kv head's projections, so at H = K these
                 are `hash_buckets(q, n, key)` and `hash_buckets(k, n, key)`),
                 computed inside the timed function (hashing and sorting are
                 part of the cost), `num_buckets=n` so each bucket's run is
                 padded to whole tiles and cross-bucket tiles are skipped.
                 `block` is the tile (the default 512; bucketed/4 also at
                 `Grid.small_block`).
    dropped/kP   `lca.sparse.dropped_attention` with P% of the keys dropped
                 (random keep masks, seeded) and every query kept, so every
                 query has an output to compare; capacity (T, the most keys
                 a head keeps).
  mode "fwd", H = K = 4 at `Grid.hyper_lengths`:
    blockwise    dense causal attention, exact
    hyper/mM     `lca.sparse.hyper_attention`, approximate, block
                 `Grid.hyper_block` (256, the paper's default: exact leaves of
                 2 (block + M) tokens) and sample_size M for each M of
                 `Grid.hyper_samples` (64 / 256 / 1024), so its error is
                 reported against both M and T.

Each row's seconds: the median of `repeats` rounds after one warm-up call,
the variants of one (T, mode, heads) called in turn each round
(`timing.round_robin`), so a load change on the shared machine falls on all
alike. `max_rel_error` (check_len = T): max |out - dense| / max |dense| of
the outputs, the difference from dense exact attention computed in float32
by blockwise (a float64 reference does not fit at 16k on a small machine);
for bucketed and dropped rows that is the cost of the sparser mask, not a
bug. The CSV's `mask_rel_error` column checks the sparse rows against their
own mask instead: the same difference against blockwise attention with each
head's buckets (kept keys) as segment ids, ~1e-6 when the sparse kernel is
exact for its mask (up to `Grid.mask_check_max`). `flops`: the dense
problem's useful FLOPs on dense rows, empty on the others (their mask
depends on the hash).

Writes bench_sparse.csv and bench_sparse.png to the output folder; prints
the rows and the key figures (`key_figures`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lca import sparse as sparse_lib
from lca.sparse.hyper import hyper_attention
from lca.attention import attention
from lca.bench import records, timing
from lca.bench.records import Point
from lca.kernels import local as local_lib
from lca.kernels import registry

BATCH, HEADS, KV_HEADS, HEAD_DIM = 1, 4, 4, 64
GQA_KV_HEADS = 2
DENSE = "blockwise"
TILE = local_lib.default_tiles(registry.local_kernel(DENSE), 1)  # blockwise's default, 512
FILE, FIGURE = "bench_sparse.csv", "bench_sparse.png"
TARGETS = {8192: 2.0, 16384: 3.0}  # the bucketed/4 fwd+bwd speed-ups over dense


@dataclasses.dataclass(frozen=True)
class Grid:
    """What the part measures (`DEFAULT`, `QUICK`)."""

    lengths: tuple[int, ...]            # fwd+bwd rows, H = K = 4
    hyper_lengths: tuple[int, ...]      # fwd rows: dense and HyperAttention
    gqa_lengths: tuple[int, ...] = ()   # fwd+bwd rows, H = 4, K = 2 (dense, bucketed/4, dropped/k50)
    buckets: tuple[int, ...] = (2, 4, 8)
    drops: tuple[float, ...] = (0.5, 0.75)  # fractions of the keys dropped
    small_block: int | None = 256       # bucketed/4 also at this tile (None: not)
    hyper_block: int = 256
    hyper_samples: tuple[int, ...] = (64, 256, 1024)  # sample_size of each hyper row
    repeats: int = 3
    hyper_repeats: int = 2              # the dense forward at 64k is the slowest call
    mask_check_max: int = 16384         # mask_rel_error up to this T
    seed: int = 0


DEFAULT = Grid(lengths=(4096, 8192, 16384), hyper_lengths=(16384, 32768, 65536),
               gqa_lengths=(8192,))
QUICK = Grid(lengths=(1024, 2048), hyper_lengths=(2048, 4096), gqa_lengths=(2048,),
             repeats=2)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row's attention: attend(q, k, v) -> [B, T, H, D]; segments(q, k) -> its mask as
    per-head segment ids ([B, T, H] queries, [B, T, K] keys), None for dense or approximate."""

    impl: str
    block: int | None
    attend: Callable
    segments: Callable | None = None


def _inputs(t, heads, kv_heads, seed):
    """(q, k, v, w) float32: q and w [B, T, H, D], k and v [B, T, K, D], standard normal."""
    rng = np.random.default_rng([seed, t, heads, kv_heads])
    shapes = [(BATCH, t, heads, HEAD_DIM)] + [(BATCH, t, kv_heads, HEAD_DIM)] * 2 \
        + [(BATCH, t, heads, HEAD_DIM)]
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes)


def _dense(block=None):
    return Variant(DENSE, block, lambda q, k, v: attention(q, k, v, impl=DENSE, causal=True))


def _bucketed(n, heads, kv_heads, key, block):
    rotation = sparse_lib.rotation_for(key, kv_heads, HEAD_DIM, n)       # [K, D, R]
    per_query = jnp.repeat(rotation, heads // kv_heads, axis=0)          # [H, D, R]

    def segments(q, k):
        return sparse_lib.buckets_from(q, per_query, n), sparse_lib.buckets_from(k, rotation, n)

    def attend(q, k, v):
        qb, kb = segments(q, k)
        return sparse_lib.bucketed_attention(q, k, v, qb, kb, num_buckets=n, block_q=block,
                                             block_k=block)

    return Variant(f"bucketed/{n}", block, attend, segments)


def _dropped(drop, t, heads, kv_heads, seed, block):
    rng = np.random.default_rng([seed, t, kv_heads, round(100 * drop)])
    k_keep = rng.random((BATCH, t, kv_heads)) >= drop
    q_keep = np.ones((BATCH, t, heads), bool)
    capacity = (t, int(k_keep.sum(axis=1).max()))

    def segments(q, k):
        del k
        return (jnp.zeros(q.shape[:3], jnp.int32),
                jnp.where(jnp.asarray(k_keep), 0, 1).astype(jnp.int32))

    def attend(q, k, v):
        return sparse_lib.dropped_attention(q, k, v, q_keep, k_keep, capacity=capacity,
                                            block_q=block, block_k=block)

    return Variant(f"dropped/k{round(100 * drop)}", block, attend, segments)


def fwd_bwd_variants(grid, t, heads, kv_heads, block):
    """The fwd+bwd rows' variants at length t: dense, bucketed, dropped."""
    key = jax.random.key(grid.seed)
    made = [_dense(block)]
    made += [_bucketed(n, heads, kv_heads, key, block) for n in grid.buckets]
    if grid.small_block and 4 in grid.buckets and grid.small_block < min(block, t):
        made.append(_bucketed(4, heads, kv_heads, key, grid.small_block))
    made += [_dropped(d, t, heads, kv_heads, grid.seed, block) for d in grid.drops]
    return made


def _gradient(attend):
    """(grads of sum(out * w) w.r.t. q, k, v; out) of attend, jitted."""
    def loss(q, k, v, w):
        out = attend(q, k, v)
        return jnp.sum(out * w), out

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


def masked_exact(q, k, v, q_ids, k_ids):
    """Dense causal attention under per-head segment ids (q_ids [B, T, H], k_ids [B, T, K]):
    each head one batch row of blockwise attention, K/V repeated to the query heads."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    rows = lambda x: jnp.moveaxis(x, 2, 1).reshape((b * h, t) + x.shape[3:])
    spread = lambda x: jnp.repeat(x, g, axis=2)
    out = attention(rows(q)[:, :, None], rows(spread(k))[:, :, None],
                    rows(spread(v))[:, :, None], impl=DENSE, causal=True,
                    segment_ids=rows(q_ids), kv_segment_ids=rows(spread(k_ids)))
    return jnp.moveaxis(out[:, :, 0].reshape(b, h, t, d), 1, 2)


def rel_error(x, exact):
    """max |x - exact| / max |exact|, in float64."""
    x, exact = np.asarray(x, np.float64), np.asarray(exact, np.float64)
    return float(np.abs(x - exact).max() / np.abs(exact).max())


class _Kept:
    """A compiled call on fixed arguments that keeps its last result (for the error)."""

    def __init__(self, compiled, args):
        self.compiled, self.args, self.out = compiled, args, None

    def __call__(self):
        self.out = self.compiled(*self.args)
        return self.out


def _point(v, mode, t, heads, kv_heads, compiled, timed):
    median, low, high = timed
    flops = (int(timing.attention_flops(BATCH, t, t, heads, HEAD_DIM, causal=True,
                                        backward=mode == "fwd+bwd"))
             if v.impl == DENSE else None)
    memory = compiled.memory_analysis()
    return Point("sparse", v.impl, "-", 1, heads, kv_heads, t, mode, flops,
                 int(memory.temp_size_in_bytes), True, block=v.block, batch=BATCH,
                 total_bytes=timing.total_bytes(memory), sent_bytes=0, seconds=median,
                 seconds_min=low, seconds_max=high, check_len=t)


def _measure(variants, mode, t, heads, kv_heads, args, repeats, grid, log):
    """Times `variants` round-robin on args; (their Points, their mask_rel_errors or None)."""
    made = {}
    for v in variants:
        fn = (_gradient(v.attend) if mode == "fwd+bwd"
              else jax.jit(lambda q, k, v_, w, f=v.attend: f(q, k, v_)))
        compiled = fn.lower(*args).compile()
        made[v.impl, v.block] = (v, compiled, _Kept(compiled, args))
    timed = timing.round_robin({key: (kept, ()) for key, (_, _, kept) in made.items()},
                               repeats, min_seconds=0)
    output = lambda kept: kept.out[1] if mode == "fwd+bwd" else kept.out
    exact = output(made[DENSE, variants[0].block][2])
    rows, mask_errors = [], []
    for key, (v, compiled, kept) in made.items():
        p = _point(v, mode, t, heads, kv_heads, compiled, timed[key])
        p.max_rel_error = rel_error(output(kept), exact)
        mask_error = None
        if v.segments is not None and t <= grid.mask_check_max:
            q, k, vv, _ = args
            own = jax.jit(lambda q, k, vv, f=v.segments: masked_exact(q, k, vv, *f(q, k)))
            mask_error = rel_error(output(kept), own(q, k, vv))
        rows.append(p)
        mask_errors.append(mask_error)
        log(_line(p, mask_error))
    return rows, mask_errors


def measure(grid, log=print):
    """Every row of the part: ([Point], [its mask_rel_error or None])."""
    rows, mask_errors = [], []
    sets = [(HEADS, KV_HEADS, grid.lengths), (HEADS, GQA_KV_HEADS, grid.gqa_lengths)]
    for heads, kv_heads, lengths in sets:
        for t in lengths:
            block = min(TILE, t)
            variants = fwd_bwd_variants(grid, t, heads, kv_heads, block)
            if kv_heads != KV_HEADS:  # the GQA set: one of each kind
                variants = [v for v in variants if v.impl in (DENSE, "bucketed/4", "dropped/k50")
                            and v.block == block]
            got, errors = _measure(variants, "fwd+bwd", t, heads, kv_heads,
                                   _inputs(t, heads, kv_heads, grid.seed), grid.repeats, grid,
                                   log)
            rows += got
            mask_errors += errors
    key = jax.random.key(grid.seed)
    for t in grid.hyper_lengths:
        approx = [Variant(f"hyper/m{m}", grid.hyper_block, lambda q, k, v, m=m: hyper_attention(
            q, k, v, causal=True, block=grid.hyper_block, sample_size=m, key=key))
            for m in grid.hyper_samples]
        got, errors = _measure([_dense(min(TILE, t))] + approx, "fwd", t, HEADS, KV_HEADS,
                               _inputs(t, HEADS, KV_HEADS, grid.seed), grid.hyper_repeats,
                               grid, log)
        rows += got
        mask_errors += errors
    return rows, mask_errors


def compare(rows):
    """Sets each row's baseline (dense at the same T, mode and heads) and vs_baseline."""
    at = {(p.mode, p.seq_len, p.heads, p.kv_heads): p for p in rows if p.impl == DENSE}
    for p in rows:
        base = at.get((p.mode, p.seq_len, p.heads, p.kv_heads))
        if base is not None and p.seconds:
            p.baseline, p.vs_baseline = base.impl, base.seconds / p.seconds


def _line(p, mask_error=None):
    vs = "" if p.vs_baseline is None else f"{p.vs_baseline:.2f}"
    mask = "" if mask_error is None else f"{mask_error:.1e}"
    return (f"{p.impl:>12} {f'{p.heads}/{p.kv_heads}':>5} {p.seq_len:>6} {p.mode:>7}"
            f" {p.block or '':>5} {1e3 * p.seconds:10.1f}"
            f" {f'{1e3 * p.seconds_min:.1f}-{1e3 * p.seconds_max:.1f}':>17} {vs:>7}"
            f" {p.max_rel_error:>10.1e} {mask:>9} {p.temp_bytes / 2**20:9.1f}")


def table(rows, mask_errors=None) -> str:
    """One line per row: time, spread, speed-up over dense, difference from dense, own-mask
    error, compiled temporary memory."""
    mask_errors = mask_errors or [None] * len(rows)
    head = (f"{'impl':>12} {'h/kv':>5} {'T':>6} {'mode':>7} {'block':>5} {'median ms':>10}"
            f" {'min-max ms':>17} {'x dense':>7} {'vs dense':>10} {'vs mask':>9}"
            f" {'temp MiB':>9}")
    return "\n".join([head] + [_line(p, e) for p, e in zip(rows, mask_errors)])


def _k(length):
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def _find(rows, impl, mode, t, heads=HEADS, kv_heads=KV_HEADS, block=None):
    for p in rows:
        if (p.impl, p.mode, p.seq_len, p.heads, p.kv_heads) == (impl, mode, t, heads, kv_heads) \
                and (block is None or p.block == block) and p.vs_baseline:
            return p
    return None


def key_figures(rows, mask_errors=None) -> str:
    """bucketed/4 over dense fwd+bwd at 8k and 16k against the issue's targets, the best
    variant at the longest length, HyperAttention over exact at 32k with its error, and the
    sparse rows' largest error against their own mask."""
    lines = []
    for t, target in TARGETS.items():
        p = _find(rows, "bucketed/4", "fwd+bwd", t, block=min(TILE, t))
        if p is not None:
            verdict = "meets" if p.vs_baseline >= target else "misses"
            lines.append(f"bucketed/4 vs dense fwd+bwd at {_k(t)}: {p.vs_baseline:.2f}x"
                         f" ({p.seconds:.3f} s vs {p.seconds * p.vs_baseline:.3f} s;"
                         f" {verdict} the >= {target:g}x target); differs from dense by"
                         f" {p.max_rel_error:.2f} (max rel)")
        for s in rows:
            if (s.impl, s.mode, s.seq_len, s.heads, s.kv_heads) == (
                    "bucketed/4", "fwd+bwd", t, HEADS, KV_HEADS) and s.block != min(TILE, t):
                lines.append(f"  bucketed/4 at block {s.block}: {s.vs_baseline:.2f}x")
    fb = [p for p in rows if p.mode == "fwd+bwd" and p.heads == HEADS
          and p.kv_heads == KV_HEADS]
    if fb:
        t = max(p.seq_len for p in fb)
        at = sorted((p for p in fb if p.seq_len == t and p.impl != DENSE and p.vs_baseline),
                    key=lambda p: -p.vs_baseline)
        lines.append(f"fwd+bwd speed-up over dense at {_k(t)}: " + ", ".join(
            f"{p.impl}{'@' + str(p.block) if p.block != min(TILE, t) else ''}"
            f" {p.vs_baseline:.2f}x" for p in at))
    hyper = [p for p in rows if p.impl.startswith("hyper/")]
    for t in (32768,) + tuple(sorted({p.seq_len for p in hyper})):
        at = sorted((p for p in hyper if p.seq_len == t), key=lambda p: int(p.impl[7:]))
        if at:
            lines.append(f"hyper vs exact forward at {_k(t)} (block {at[0].block}): " + ", ".join(
                f"sample {p.impl[7:]} {p.vs_baseline:.2f}x (max rel error {p.max_rel_error:.3f})"
                for p in at))
            break
    checked = [e for e in mask_errors or () if e is not None]
    if checked:
        lines.append(f"bucketed and dropped against their own mask's exact attention: max rel"
                     f" error {max(checked):.1e} over {len(checked)} rows")
    return "\n".join(lines)


def run(out_dir, *, quick=False, grid=None, repeats=None, log=print):
    """Measures the part into out_dir (bench_sparse.csv, bench_sparse.png); returns its rows."""
    grid, name = records.part_grid(grid, quick=quick, repeats=repeats, grids=(QUICK, DEFAULT),
                                   out_dir=out_dir)
    start = time.time()
    log(table([]))
    rows, mask_errors = measure(grid, log)
    compare(rows)
    path = os.path.join(out_dir, FILE)
    finished = time.strftime("%Y-%m-%d")
    records.write_csv(path, rows, [{"grid": name, "finished": finished,
                                    "mask_rel_error": e} for e in mask_errors])
    print(table(rows, mask_errors))
    print(key_figures(rows, mask_errors))
    from lca.bench import plots  # noqa: PLC0415 (matplotlib only here)

    print(f"wrote {path}\nwrote {plots.plot_sparse(rows, os.path.join(out_dir, FIGURE))}")
    print(f"sparse part measured in {time.time() - start:.0f} s")
    return rows
