"""The default local kernel's efficiency over length and tile: does it hold its pace to 64k?

    python experiments/bench.py --part efficiency [--quick] [--out out/bench]

One device (this process), batch 1, 4 heads of 64, float32, causal
forward+backward of the default local kernel (`blockwise` on the CPU) at every
length and tile of the grid. The tiles of one length are timed round-robin in
the same rounds; each row's `peak_fraction` is its useful FLOP/s
(`timing.attention_flops`, 3.5x the causal forward) over the matmul peak, the
larger of the peaks measured at the start and the end of the run (a shared
machine is noisy: compare rows of one run, not runs). `vs_baseline` is the
default tile's seconds over the row's at the same length (> 1: faster than
the default). The key figures: the default tile's efficiency at the longest
length against its best over the lengths (the goal: within 10%), and the
fastest tile per length, which is how the registry's default is chosen.
Writes bench_efficiency.csv and bench_efficiency.png. The default grid takes
about 8 minutes here; --quick, under a minute.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from lca.attention import attention
from lca.bench import records, timing
from lca.bench.records import Point
from lca.kernels import local as local_lib
from lca.kernels import registry

BATCH, HEADS, HEAD_DIM = 1, 4, 64
FILE, FIGURE = "bench_efficiency.csv", "bench_efficiency.png"
GOAL = 0.9  # the longest length's efficiency over the best length's


@dataclasses.dataclass(frozen=True)
class Grid:
    """What the part measures (`DEFAULT`, `QUICK`)."""

    lengths: tuple[int, ...]
    blocks: tuple[int, ...]
    repeats: int = 3
    long_repeats: int = 2   # from 32k, where one call takes tens of seconds
    seed: int = 0


DEFAULT = Grid(lengths=(2048, 4096, 8192, 16384, 32768, 65536), blocks=(256, 512, 1024))
QUICK = Grid(lengths=(1024, 2048, 4096), blocks=(256, 512), repeats=2)


def _program(kernel, t, block, seed):
    """(compiled fwd+bwd, its args, temp bytes) at length t and tile `block`."""
    rng = np.random.default_rng([seed, t])
    q, k, v, ct = (jnp.asarray(rng.standard_normal((BATCH, t, HEADS, HEAD_DIM), np.float32))
                   for _ in range(4))

    def loss(q, k, v):
        out = attention(q, k, v, impl=kernel, causal=True, block_q=block, block_k=block)
        return (out * ct).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled, (q, k, v), compiled.memory_analysis().temp_size_in_bytes


def measure(grid, log=print):
    """Rows of the grid, in (length, tile) order."""
    kernel = registry.local_kernel().name
    default = local_lib.default_tiles(registry.local_kernel(kernel), 1)
    peak = timing.matmul_peak_flops()
    timed = []
    for t in grid.lengths:
        blocks = [b for b in grid.blocks if b <= t]
        programs = {b: _program(kernel, t, b, grid.seed) for b in blocks}
        repeats = grid.long_repeats if t >= 32768 else grid.repeats
        times = timing.round_robin({b: p[:2] for b, p in programs.items()}, repeats)
        for b in blocks:
            timed.append((t, b, times[b], programs[b][2]))
        log(f"  T={t:,}: " + ", ".join(f"tile {b} {times[b][0]:.3f} s" for b in blocks))
    peak = max(peak, timing.matmul_peak_flops())
    rows = []
    for t, b, (median, low, high), temp in timed:
        flops = int(timing.attention_flops(BATCH, t, t, HEADS, HEAD_DIM, causal=True,
                                           backward=True))
        base = next((s for tt, bb, s, _ in timed if tt == t and bb == default), None)
        rows.append(Point(
            part="efficiency", impl=kernel, layout="-", n=1, heads=HEADS, kv_heads=HEADS,
            seq_len=t, mode="fwd+bwd", flops=flops, temp_bytes=int(temp), fits=True,
            block=b, seconds=median, seconds_min=low, seconds_max=high,
            peak_fraction=flops / median / peak, baseline=f"{kernel}/{default}",
            vs_baseline=None if base is None else base[0] / median))
    return rows, peak


def table(rows) -> str:
    head = "| T | tile | seconds (min-max) | of matmul peak | default tile / this |"
    lines = [head, "|---|---|---|---|---|"]
    for p in rows:
        vs = "" if p.vs_baseline is None else f"{p.vs_baseline:.2f}"
        lines.append(f"| {p.seq_len:,} | {p.block} | {p.seconds:.3f} ({p.seconds_min:.3f}-"
                     f"{p.seconds_max:.3f}) | {p.peak_fraction:.2f} | {vs} |")
    return "\n".join(lines)


def key_figures(rows, default=None) -> str:
    """The default tile's efficiency over length against the goal, and the best tiles."""
    if not rows:
        return "no rows"
    default = default or int(rows[0].baseline.rsplit("/", 1)[1])
    mine = sorted((p for p in rows if p.block == default), key=lambda p: p.seq_len)
    lines = []
    if mine:
        best = max(mine, key=lambda p: p.peak_fraction)
        last = mine[-1]
        ratio = last.peak_fraction / best.peak_fraction
        lines.append(
            f"tile {default}: " + ", ".join(f"{p.seq_len // 1024}k {p.peak_fraction:.2f}"
                                            for p in mine)
            + f" of the matmul peak; at {last.seq_len:,} {ratio:.0%} of its best"
              f" ({best.seq_len:,}): goal {GOAL:.0%} "
            + ("MET" if ratio >= GOAL else "MISSED"))
    by_length = {}
    for p in rows:
        if p.seq_len not in by_length or p.seconds < by_length[p.seq_len].seconds:
            by_length[p.seq_len] = p
    lines.append("fastest tile by length: " + ", ".join(
        f"{t // 1024}k {p.block}" for t, p in sorted(by_length.items())))
    return "\n".join(lines)


def run(out_dir, *, quick=False, grid=None, repeats=None, log=print):
    """Measures the part into out_dir (bench_efficiency.csv and .png); returns its rows."""
    grid, name = records.part_grid(grid, quick=quick, repeats=repeats, grids=(QUICK, DEFAULT),
                                   out_dir=out_dir)
    start = time.time()
    rows, peak = measure(grid, log)
    path = f"{out_dir}/{FILE}"
    records.write_csv(path, rows, {"grid": name, "finished": time.strftime("%Y-%m-%d"),
                                   "peak_flops": f"{peak:.4g}"})
    print(table(rows))
    print(key_figures(rows))
    from lca.bench import plots  # noqa: PLC0415 (matplotlib only here)

    print(f"wrote {path}\nwrote {plots.plot_efficiency(rows, f'{out_dir}/{FIGURE}')}")
    print(f"efficiency part measured in {time.time() - start:.0f} s")
    return rows
