"""Timing, compiled memory, FLOP counts and the machine's measured matmul peak.

Absolute times on a shared machine are noise; what a benchmark reports are
medians and ratios measured in the same run.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, *args, repeats: int = 3, warmup: bool = True) -> float:
    """Median wall time of `fn(*args)` over `repeats` runs, after one warm-up run if `warmup`."""
    if warmup:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a size x size float32 matmul on the default device, the fastest of
    `repeats` (on a shared machine the closest to what the hardware can do): the peak."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, a))
    return 2 * size**3 / min(median_seconds(matmul, a, a, repeats=1, warmup=False)
                             for _ in range(repeats))


def attention_flops(batch, q_len, kv_len, heads, head_dim, *, causal, backward=False):
    """Useful FLOPs: 4·B·H·T·S·D forward, half of it causal; forward+backward is 3.5x."""
    flops = 4 * batch * heads * q_len * kv_len * head_dim * (0.5 if causal else 1.0)
    return flops * (3.5 if backward else 1.0)


def linear_flops(batch, seq_len, heads, key_dim, value_dim, *, chunk_size, backward=False):
    """Useful FLOPs of chunked causal linear attention: per token and head, the causal
    half of the intra-chunk products plus the state read and update.

    Forward: B·H·T·(2·C·K + 4·K·V) (C: chunk, K/V: key/value dims); forward+backward
    is 3.5x, as for softmax attention. An integer.
    """
    flops = batch * heads * seq_len * (2 * chunk_size * key_dim + 4 * key_dim * value_dim)
    return flops * 7 // 2 if backward else flops


def round_robin(points, repeats, *, min_seconds=0.2, on_round=None):
    """{key: (median, min, max) seconds per call}; points: {key: (fn, args)}.

    One warm-up call each; then `repeats` rounds, each calling every point in
    turn, so a load change on a shared machine falls on all of them alike. A
    point faster than `min_seconds` is called back to back enough times per
    round to take about that long, so short points are not timer noise.
    `on_round()` is called after every round (a progress bar).
    """
    calls = {}
    for key, (fn, args) in points.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        calls[key] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
    times = {key: [] for key in points}
    for _ in range(repeats):
        for key, (fn, args) in points.items():
            start = time.perf_counter()
            for _ in range(calls[key]):
                out = fn(*args)
            jax.block_until_ready(out)
            times[key].append((time.perf_counter() - start) / calls[key])
        if on_round is not None:
            on_round()
    return {key: (statistics.median(t), min(t), max(t)) for key, t in times.items()}


def physical_memory_bytes() -> int:
    """The machine's physical memory: a budget that does not change between runs."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def total_bytes(memory) -> int:
    """Per-device bytes of a compiled program: arguments + outputs + temporaries - aliased."""
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
               + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
