"""Single-device attention benchmark: `xla` against `blockwise`, same run.

Each point is compiled first; its temporary memory is read from the compiled
executable, and a point that would not fit in the memory budget is reported as
such instead of being run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import lca
from lca.bench import records, timing


@dataclasses.dataclass
class Row:
    seq_len: int
    impl: str
    mode: str  # "fwd" or "fwd+bwd"
    seconds: float | None  # None: did not fit
    temp_bytes: int
    gflops: float | None = None
    peak_fraction: float | None = None
    speedup_vs_xla: float | None = None


def _step(impl, mode, causal, options):
    def forward(q, k, v):
        return lca.attention(q, k, v, impl=impl, causal=causal, **options)

    if mode == "fwd":
        return jax.jit(forward)

    def loss(q, k, v):
        return forward(q, k, v).astype(jnp.float32).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def run(seq_lens=(2048, 4096, 8192, 16384), impls=("xla", "blockwise"), *, batch=1,
        heads=4, kv_heads=None, head_dim=64, causal=True, dtype="float32", repeats=3,
        memory_budget=None, block_q=512, block_k=512, seed=0):
    """Times every (length, impl, mode); returns (rows, measured matmul peak FLOP/s)."""
    kv_heads = kv_heads or heads
    budget = memory_budget or int(0.6 * timing.available_memory_bytes())
    peak = timing.matmul_peak_flops()
    rng = np.random.default_rng(seed)
    rows = []
    points = [(t, i, m) for t in seq_lens for i in impls for m in ("fwd", "fwd+bwd")]
    for seq_len, impl, mode in tqdm(points, desc="attention benchmark", unit="point"):
        shape_q, shape_kv = (batch, seq_len, heads, head_dim), (batch, seq_len, kv_heads, head_dim)
        q = jnp.asarray(rng.standard_normal(shape_q), dtype)
        k, v = (jnp.asarray(rng.standard_normal(shape_kv), dtype) for _ in range(2))
        options = {"block_q": block_q, "block_k": block_k} if impl == "blockwise" else {}
        compiled = _step(impl, mode, causal, options).lower(q, k, v).compile()
        temp = timing.temp_bytes(compiled)
        if temp > budget:
            rows.append(Row(seq_len, impl, mode, None, temp))
            continue
        seconds = timing.median_seconds(compiled, q, k, v, repeats=repeats)
        flops = timing.attention_flops(batch, seq_len, seq_len, heads, head_dim,
                                       causal=causal, backward=mode != "fwd")
        rows.append(Row(seq_len, impl, mode, seconds, temp, flops / seconds / 1e9,
                        flops / seconds / peak))
        del compiled
    baseline = {(r.seq_len, r.mode): r.seconds for r in rows if r.impl == "xla"}
    for r in rows:
        base = baseline.get((r.seq_len, r.mode))
        if base is not None and r.seconds is not None:
            r.speedup_vs_xla = base / r.seconds
    return rows, peak


def format_table(rows, peak) -> str:
    lines = [f"matmul peak (2048x2048 float32, measured in this run): {peak / 1e9:.1f} GFLOP/s",
             f"{'T':>6} {'impl':>10} {'mode':>8} {'median s':>9} {'x vs xla':>8} "
             f"{'GFLOP/s':>8} {'% peak':>7} {'temp MiB':>9}"]
    for r in rows:
        mib = f"{r.temp_bytes / 2**20:9.1f}"
        if r.seconds is None:
            lines.append(f"{r.seq_len:>6} {r.impl:>10} {r.mode:>8} {'does not fit in memory':>35} {mib}")
            continue
        speed = "" if r.speedup_vs_xla is None else f"{r.speedup_vs_xla:.2f}"
        lines.append(f"{r.seq_len:>6} {r.impl:>10} {r.mode:>8} {r.seconds:9.3f} {speed:>8} "
                     f"{r.gflops:8.1f} {100 * r.peak_fraction:6.1f}% {mib}")
    return "\n".join(lines)


def write_csv(rows, peak, path):
    records.write_csv(path, rows, {"matmul_peak_gflops": peak / 1e9})
