"""The decode part: per-token time with the KV cache against recomputing, one device and a mesh.

    python experiments/bench.py --part decode [--quick] [--out DIR]

One small model (`config()`: 2 layers, embed 64, heads 8 / kv_heads 2,
head_dim 32, vocab 128, float32, ring attention in the zigzag layout), batch
1. Rows are `Point`s with part "decode" (L = `seq_len`, the cache length):

  mode "decode", one device (n = 1):
    cache           one compiled decode step (`model.decode`, cache donated)
    recompute       one forward of all L tokens (`model(tokens)`), what a
                    generator without a cache does per token (up to
                    `Grid.recompute_max`: it is quadratic in L)
  mode "decode", a (sequence=n) mesh of emulated CPU devices (n = 8):
    cache_sharded   the cache left where prefill put it; one max + one sum
                    all-reduce per layer (`lca.kernels.decode`)
    cache_gathered  the baseline: each layer's cache all-gathered every step
                    (`gather_cache=True`); it gathers and attends to the whole
                    capacity, L rounded up to whole 256-slot tiles per shard
                    plus the tile the new tokens go to
  mode "prefill", on the mesh: the compiled prefill of L tokens per strategy
    (ring, allgather, ulysses on (ulysses=n), usp on (ulysses=2, sequence=n/2)).

A decode row's seconds are the median over `Grid.steps` consecutive steps
after one warm-up step (tokens/s = batch / seconds), each step attending to
L (+ the steps so far) keys; a recompute or prefill row's the median of
`Grid.repeats` calls after one warm-up. sent_bytes: what one device sends
per call, read from the compiled HLO (`lca.bench.hlo`); temp_bytes and
total_bytes: compiled memory per device.

The cache at length L is not made by prefilling L tokens: prefill is
quadratic, and on a 2-core CPU one of 256k tokens would take about 256x the
16k one (minutes per call, for every length and variant). `filled()` takes
the empty cache of capacity L + `SLACK` (`lca.models.cache.empty`, sharded
as prefill's) and gives it what a prefill of L tokens leaves: every slot's
position (`slot_positions` in layout order, so every shard holds L / n used
slots), length = prefilled = L, and random K/V (in every slot; the unused
ones are neither read nor seen). Decode reads exactly the used tiles of
each shard (`decode.used_slots`), so a step costs what it would after a
real prefill; tests/test_bench_decode.py checks that a filled cache has
prefill's positions and counts and decodes the same logits.

Mesh rows run in this process when it has n devices, else in a subprocess
with n emulated CPU devices (as `lca.bench.figures` does for the suite).
Writes bench_decode.csv and bench_decode.png to the output folder; prints
the rows and the key figures (`key_figures`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from lca import generation, layouts
from lca.bench import hlo, records, timing
from lca.bench.records import Point
from lca.models import ModelConfig, Transformer
from lca.models import cache as cache_lib
from lca.parallel import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCH = 1
SLACK = 64          # cache slots past L, where the warm-up and timed steps write
STRATEGIES = ("ring", "allgather", "ulysses", "usp")
FILE, FIGURE = "bench_decode.csv", "bench_decode.png"


@dataclasses.dataclass(frozen=True)
class Grid:
    """What the part measures (`DEFAULT`, `QUICK`)."""

    lengths: tuple[int, ...]        # cache lengths L (multiples of 2n: zigzag on n shards)
    recompute_max: int              # recompute rows only up to this L
    prefill_lens: tuple[int, ...]   # prefill rows per strategy
    steps: int = 20                 # timed decode steps per decode row
    repeats: int = 3                # timed calls per recompute and prefill row
    strategies: tuple[str, ...] = STRATEGIES

    def __post_init__(self):
        if self.steps + 1 > SLACK:
            raise ValueError(f"steps={self.steps} + 1 warm-up step exceed the {SLACK} cache"
                             f" slots past L (SLACK); use steps <= {SLACK - 1}")


DEFAULT = Grid(lengths=tuple(1024 * 2**i for i in range(9)), recompute_max=32768,
               prefill_lens=(8192, 16384))
QUICK = Grid(lengths=(1024, 2048, 4096, 8192), recompute_max=8192, prefill_lens=(1024,),
             steps=10, repeats=2)


def config(attention="ring") -> ModelConfig:
    """The part's model, its layers running `attention`."""
    return ModelConfig(vocab_size=128, embed=64, layers=2, heads=8, kv_heads=2, head_dim=32,
                       mlp=256, attention=(attention,), layout="zigzag")


def filled(cache, length, ctx, *, seed=0, layers=None):
    """`cache` (empty, capacity >= length) as a prefill of `length` tokens would leave it.

    Slots hold their positions in layout order (shard r: its length / n prompt
    positions, then EMPTY), length = prefilled = `length`; K/V per layer are
    `layers` if given (each [B, C, K, D], sharded as the cache's), else standard
    normal from `seed`. Placed with the empty cache's shardings.
    """
    meta = cache.meta
    if not all(isinstance(entry, tuple) for entry in cache.layers):
        raise ValueError("filled() makes softmax layers' K/V; this model has a linear layer,"
                         " whose state a prefill of L tokens would have to compute")
    order = (layouts.positions(length, meta.model.layout, ctx.sequence_shards)
             if meta.shards > 1 else np.arange(length, dtype=np.int32))
    slots = cache_lib.slot_positions(order, meta.capacity // meta.shards, meta.shards)
    put = lambda x, like: jax.device_put(x, like.sharding)
    if layers is None:
        rng = np.random.default_rng(seed)
        layers = tuple(tuple(put(rng.standard_normal(a.shape, np.float32).astype(a.dtype), a)
                             for a in entry) for entry in cache.layers)
    return cache_lib.Cache(tuple(layers), put(slots, cache.positions),
                           put(np.int32(length), cache.length),
                           put(np.int32(length), cache.prefilled), meta)


class _Stepper:
    """Calls a compiled decode step on its own cache (donated, replaced by the result)."""

    def __init__(self, step, state, cache):
        self.step, self.state, self.cache = step, state, cache
        self.tokens = np.zeros((BATCH,), np.int32)

    def __call__(self):
        logits, self.cache = self.step(self.state, self.cache, self.tokens)
        return logits


def _decode_stepper(graphdef, state, ctx, length, gather):
    """(a _Stepper at cache length `length`, its compiled step)."""
    make_empty, _ = generation._programs(graphdef, ctx, 0, length + SLACK, BATCH)
    _, empty = make_empty(state, np.zeros((BATCH, 0), np.int32))
    cache = filled(empty, length, ctx, seed=length)
    step = jax.jit(lambda s, c, t: nnx.merge(graphdef, s).decode(c, t, ctx=ctx,
                                                                 gather_cache=gather),
                   donate_argnums=1)
    compiled = step.lower(state, cache, np.zeros((BATCH,), np.int32)).compile()
    return _Stepper(compiled, state, cache), compiled


def _sent(compiled):
    try:
        return hlo.sent_bytes(compiled.as_text())
    except ValueError:  # a collective in a loop of unknown trip count: not counted
        return None


def _point(impl, cfg, n, length, mode, flops, compiled, timed, *, layout, block=None,
           local=""):
    memory = compiled.memory_analysis()
    median, low, high = timed
    return Point("decode", impl, layout, n, cfg.heads, cfg.kv_heads, length, mode, int(flops),
                 int(memory.temp_size_in_bytes), True, local=local, block=block, batch=BATCH,
                 total_bytes=timing.total_bytes(memory),
                 sent_bytes=_sent(compiled) if n > 1 else 0, seconds=median,
                 seconds_min=low, seconds_max=high)


def _decode_flops(cfg, length):
    return cfg.layers * timing.attention_flops(BATCH, 1, length, cfg.heads, cfg.head_dim,
                                               causal=False)


def _forward_flops(cfg, length):
    return cfg.layers * timing.attention_flops(BATCH, length, length, cfg.heads, cfg.head_dim,
                                               causal=True)


def _tokens(cfg, length):
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, length)).astype(np.int32)


def one_device(grid, log=print):
    """The cache and recompute rows on one device."""
    cfg = config()
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    state = jax.device_put(state, jax.devices()[0])
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    rows = []
    for length in grid.lengths:
        stepper, compiled = _decode_stepper(graphdef, state, None, length, gather=False)
        timed = timing.round_robin({0: (stepper, ())}, grid.steps, min_seconds=0)[0]
        rows.append(_point("cache", cfg, 1, length, "decode", _decode_flops(cfg, length),
                           compiled, timed, layout="-", block=stepper.cache.meta.tile))
        log(_line(rows[-1]))
        if length <= grid.recompute_max:
            tokens = _tokens(cfg, length)
            compiled = forward.lower(state, tokens).compile()
            timed = timing.round_robin({0: (compiled, (state, tokens))}, grid.repeats,
                                       min_seconds=0)[0]
            rows.append(_point("recompute", cfg, 1, length, "decode",
                               _forward_flops(cfg, length), compiled, timed, layout="-",
                               local=cfg.local))
            log(_line(rows[-1]))
    return rows


def _strategy_mesh(strategy, n):
    axes = {"ulysses": {"ulysses": n}, "usp": {"ulysses": 2, "sequence": n // 2}}
    return make_mesh(axes.get(strategy, {"sequence": n}), jax.devices()[:n])


def on_mesh(grid, n, log=print):
    """The sharded and all-gathered cache rows on a (sequence=n) mesh, then prefill rows."""
    cfg = config()
    mesh = make_mesh({"sequence": n}, jax.devices()[:n])
    ctx = generation.context(mesh)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    state = generation._on_mesh(state, mesh)
    rows = []
    for length in grid.lengths:
        made = {impl: _decode_stepper(graphdef, state, ctx, length, gather)
                for impl, gather in (("cache_sharded", False), ("cache_gathered", True))}
        timed = timing.round_robin({impl: (s, ()) for impl, (s, _) in made.items()},
                                   grid.steps, min_seconds=0)  # alternating: the same load
        for impl, (stepper, compiled) in made.items():
            rows.append(_point(impl, cfg, n, length, "decode", _decode_flops(cfg, length),
                               compiled, timed[impl], layout=cfg.layout,
                               block=stepper.cache.meta.tile))
            log(_line(rows[-1]))
        del made, timed  # the gathered cache's buffers before the next length
    for strategy in grid.strategies:
        if strategy == "usp" and (n < 4 or n % 2):
            continue
        model_cfg = config(strategy)
        mesh = _strategy_mesh(strategy, n)
        ctx = generation.context(mesh)
        graphdef, state = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(0)))
        state = generation._on_mesh(state, mesh)
        for length in grid.prefill_lens:
            prefill, _ = generation._programs(graphdef, ctx, length, length + SLACK, BATCH)
            tokens = _tokens(cfg, length)
            compiled = prefill.lower(state, tokens).compile()
            timed = timing.round_robin({0: (compiled, (state, tokens))}, grid.repeats,
                                       min_seconds=0)[0]
            rows.append(_point(strategy, model_cfg, n, length, "prefill",
                               _forward_flops(cfg, length), compiled, timed,
                               layout=model_cfg.layout, local=model_cfg.local))
            log(_line(rows[-1]))
    return rows


def _in_subprocess(grid, n):
    """on_mesh in a fresh interpreter with n emulated CPU devices; its Points."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.csv")
        subprocess.run([sys.executable, "-m", "lca.bench.decode", path, str(n),
                        json.dumps(dataclasses.asdict(grid))],
                       check=True, env=dict(os.environ, PYTHONPATH=REPO))
        return records.read_points(path)


BASELINES = {"cache": "recompute", "cache_sharded": "cache_gathered", "ring": "allgather",
             "ulysses": "allgather", "usp": "allgather", "allgather": "allgather"}


def compare(rows):
    """Sets each row's baseline and vs_baseline (baseline seconds / seconds) in place."""
    at = {(p.impl, p.mode, p.seq_len): p for p in rows}
    for p in rows:
        base = at.get((BASELINES.get(p.impl), p.mode, p.seq_len))
        if base is not None and p.seconds:
            p.baseline, p.vs_baseline = base.impl, base.seconds / p.seconds


def _line(p):
    sent = "" if p.sent_bytes is None else f"{p.sent_bytes:,d}"
    rate = f"{p.batch / p.seconds:,.1f}" if p.mode == "decode" else ""
    vs = "" if p.vs_baseline is None else f"{p.vs_baseline:.2f}"
    return (f"{p.impl:>15} {p.n:>2} {p.seq_len:>7} {p.mode:>7} {1e3 * p.seconds:11.3f}"
            f" {f'{1e3 * p.seconds_min:.3f}-{1e3 * p.seconds_max:.3f}':>19} {rate:>9}"
            f" {vs:>7} {sent:>13} {p.temp_bytes / 2**20:9.1f}")


def table(rows) -> str:
    head = (f"{'impl':>15} {'n':>2} {'L':>7} {'mode':>7} {'median ms':>11} {'min-max ms':>19}"
            f" {'tokens/s':>9} {'x base':>7} {'sent B/call':>13} {'temp MiB':>9}")
    return "\n".join([head] + [_line(p) for p in rows])


def _series(rows, impl, mode="decode"):
    return sorted((p for p in rows if p.impl == impl and p.mode == mode and p.seconds),
                  key=lambda p: p.seq_len)


def _k(length):
    return f"{length // 1024}k" if length >= 1024 and length % 1024 == 0 else str(length)


def _per_doubling(ps):
    """Time growth per doubling of L along ps: 2 ** the least-squares slope of
    log2(seconds) against log2(L) (less swayed by one noisy point than the ends)."""
    return 2 ** np.polyfit(np.log2([p.seq_len for p in ps]), np.log2([p.seconds for p in ps]),
                           1)[0]


def _growth(ps):
    """Per-token time per doubling of L along a series: each doubling, then the fitted
    growth over the whole series and from 16k on (where fixed overheads matter least)."""
    pairs = [(a, b) for a, b in zip(ps, ps[1:]) if b.seq_len == 2 * a.seq_len]
    if not pairs:
        return ""
    text = ("per-token time per doubling of L: "
            + ", ".join(f"{_k(b.seq_len)} {b.seconds / a.seconds:.2f}x" for a, b in pairs)
            + f"; fitted {_per_doubling(ps):.2f}x from {_k(ps[0].seq_len)} to"
              f" {_k(ps[-1].seq_len)} ({ps[-1].seconds / ps[0].seconds:.1f}x the time for"
              f" {ps[-1].seq_len // ps[0].seq_len}x the length)")
    tail = [p for p in ps if p.seq_len >= 16384]
    if len(tail) > 2 and len(tail) < len(ps):
        text += f", {_per_doubling(tail):.2f}x from {_k(tail[0].seq_len)}"
    return text


def key_figures(rows) -> str:
    """The ratios measured in this run: cache vs recompute, growth per doubling, bytes."""
    lines = []
    cache, recompute = _series(rows, "cache"), {p.seq_len: p for p in _series(rows, "recompute")}
    both = [p for p in cache if p.seq_len in recompute]
    if both:
        p = next((p for p in both if p.seq_len == 8192), both[-1])
        r = recompute[p.seq_len]
        lines.append(f"cache vs recompute at {_k(p.seq_len)} on one device:"
                     f" {r.seconds / p.seconds:,.0f}x faster per token ({1e3 * p.seconds:.2f} ms"
                     f" vs {r.seconds:.3f} s; {BATCH / p.seconds:,.0f} vs"
                     f" {BATCH / r.seconds:.2f} tokens/s)")
    for impl in ("cache", "recompute", "cache_sharded", "cache_gathered"):
        line = _growth(_series(rows, impl))
        if line:
            lines.append(f"{impl} (n={_series(rows, impl)[0].n}): {line}")
    for impl in ("cache_sharded", "cache_gathered"):
        ps = [p for p in _series(rows, impl) if p.sent_bytes is not None]
        if ps:
            sent = sorted({p.sent_bytes for p in ps})
            what = (f"{sent[0]:,d} B at every L (constant)" if len(sent) == 1 else
                    f"{ps[0].sent_bytes:,d} B at {_k(ps[0].seq_len)} -> {ps[-1].sent_bytes:,d} B"
                    f" at {_k(ps[-1].seq_len)} ({ps[-1].sent_bytes / ps[0].sent_bytes:.0f}x)")
            lines.append(f"bytes sent per decode step, {impl} (n={ps[0].n}): {what}")
    sharded = _series(rows, "cache_sharded")
    if sharded and sharded[-1].vs_baseline:
        p = sharded[-1]
        lines.append(f"sharded vs all-gathered cache at {_k(p.seq_len)} on n={p.n}:"
                     f" {p.vs_baseline:.1f}x faster per token")
    for length in sorted({p.seq_len for p in rows if p.mode == "prefill"}):
        ps = [p for p in rows if p.mode == "prefill" and p.seq_len == length]
        lines.append(f"prefill of {_k(length)} on n={ps[0].n}: " + ", ".join(
            f"{p.impl} {p.seconds:.3f} s" + (f" ({p.vs_baseline:.2f}x allgather)"
                                            if p.impl != "allgather" and p.vs_baseline else "")
            for p in ps))
    return "\n".join(lines)


def run(out_dir, *, quick=False, grid=None, repeats=None, devices=8, log=print):
    """Measures the part into out_dir (bench_decode.csv, bench_decode.png); returns its rows.

    Mesh rows need devices > 1; they run here when this process has that many
    devices, else in a subprocess with them.
    """
    grid, name = records.part_grid(grid, quick=quick, repeats=repeats, grids=(QUICK, DEFAULT),
                                   out_dir=out_dir)
    start = time.time()
    log(table([]))
    rows = one_device(grid, log)
    if devices > 1:
        rows += (on_mesh(grid, devices, log) if len(jax.devices()) >= devices
                 else _in_subprocess(grid, devices))
    compare(rows)
    path = os.path.join(out_dir, FILE)
    records.write_csv(path, rows, {"grid": name,
                                   "finished": time.strftime("%Y-%m-%d")})
    print(table(rows))
    print(key_figures(rows))
    from lca.bench import plots  # noqa: PLC0415 (matplotlib only here)

    print(f"wrote {path}\nwrote {plots.plot_decode(rows, os.path.join(out_dir, FIGURE))}")
    print(f"decode part measured in {time.time() - start:.0f} s")
    return rows


if __name__ == "__main__":  # the mesh process of `run`
    out, devices, grid_json = sys.argv[1:]
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(devices))
    grid = Grid(**{k: tuple(v) if isinstance(v, list) else v
                   for k, v in json.loads(grid_json).items()})
    records.write_csv(out, on_mesh(grid, int(devices), log=lambda s: print(s, flush=True)))
