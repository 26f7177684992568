"""Ring load balance: which layout a real mesh waits least for, timed on one device.

    python experiments/bench.py --part balance [--quick]

A real mesh waits, at every ring step, for its slowest rank. On one device
(in a one-device process) we time the real per-step kernels
(`ring.step_forward` then `ring.step_backward` over the default local kernel,
exactly what the ring runs) for every (step, rank) pair of a layout, and sum
over steps the slowest rank: the critical path. Each (step, rank) is timed
round-robin over every layout, and the fastest of the repeats counts (slower
ones add other processes' interference, which the max over ranks would then
pick up). One `Point` per layout: seconds = critical path, block = its tile.
`tools/tables.py` sets the cost model's prediction beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lca import layouts
from lca.bench import timing
from lca.bench.records import Point
from lca.kernels import local as local_lib
from lca.kernels import masks as masks_lib
from lca.kernels import registry, ring

QUICK = dict(seq_len=8192, repeats=2)
DEFAULT = dict(seq_len=32768, repeats=6)


def _step_kernels(kernel, shard_len, heads, kv_heads, head_dim, block):
    """Jitted (forward step, backward step) of one device, positions as arguments."""
    q = jax.ShapeDtypeStruct((1, shard_len, heads, head_dim), jnp.float32)
    k = jax.ShapeDtypeStruct((1, shard_len, kv_heads, head_dim), jnp.float32)
    cfg = local_lib.config(kernel, q, k, causal=True, window=None, segments=False, scale=None,
                           block_q=block, block_k=block)
    arrays = lambda q_pos, kv_pos: masks_lib.MaskArrays(q_pos[None], kv_pos[None], None, None)

    @jax.jit
    def forward(q, kv, q_pos, kv_pos, out, lse):
        return ring.step_forward(kernel, cfg, q, kv, arrays(q_pos, kv_pos), out, lse)

    @jax.jit
    def backward(q, kv, q_pos, kv_pos, lse, do, delta, dq, dkv):
        return ring.step_backward(kernel, cfg, q, kv, arrays(q_pos, kv_pos), lse, do, delta,
                                  dq, dkv)

    return forward, backward


def step_times(seq_len=32768, num_shards=8, layout_names=layouts.LAYOUTS, *, heads=2,
               kv_heads=2, head_dim=64, repeats=2, seed=0, progress=True):
    """({layout: seconds [steps, ranks]}, {layout: tile}) of one ring step's forward+backward."""
    kernel = registry.local_kernel()
    shard_len = seq_len // num_shards
    for name in layout_names:
        layouts.check_layout(seq_len, name, num_shards)
    blocks = {name: local_lib.default_tiles(kernel, heads // kv_heads, name, shard_len)
              for name in layout_names}
    steps = {b: _step_kernels(kernel, shard_len, heads, kv_heads, head_dim, b)
             for b in set(blocks.values())}
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, do = normal(1, shard_len, heads, head_dim), normal(1, shard_len, heads, head_dim)
    kv = normal(2, 1, shard_len, kv_heads, head_dim)
    out, dq, dkv = jnp.zeros_like(q), jnp.zeros_like(q), jnp.zeros_like(kv)
    lse, delta = normal(1, shard_len, heads), normal(1, shard_len, heads)

    def pair(name, q_pos, kv_pos):
        forward, backward = steps[blocks[name]]
        return (forward(q, kv, q_pos, kv_pos, out, lse),
                backward(q, kv, q_pos, kv_pos, lse, do, delta, dq, dkv))

    shards = {name: jnp.asarray(layouts.shard_positions(seq_len, name, num_shards))
              for name in layout_names}
    for name in layout_names:  # compile once per tile: positions are arguments
        jax.block_until_ready(pair(name, shards[name][0], shards[name][0]))
    points = [(name, s, r) for name in layout_names for s in range(num_shards)
              for r in range(num_shards)]
    samples = {p: [] for p in points}
    with tqdm(total=len(points) * repeats, desc="load balance: (layout, step, rank)",
              unit="pair", disable=not progress) as bar:
        for _ in range(repeats):
            for name, s, r in points:
                q_pos, kv_pos = shards[name][r], shards[name][(r - s) % num_shards]
                samples[name, s, r].append(timing.median_seconds(
                    pair, name, q_pos, kv_pos, repeats=1, warmup=False))
                bar.update()
    times = {name: np.zeros((num_shards, num_shards)) for name in layout_names}
    for (name, s, r), t in samples.items():
        times[name][s, r] = min(t)
    return times, blocks


def run(seq_len=32768, num_shards=8, *, heads=2, kv_heads=2, head_dim=64, repeats=6,
        progress=True):
    """One Point per layout: the critical path (sum over steps of the slowest rank)."""
    times, blocks = step_times(seq_len, num_shards, heads=heads, kv_heads=kv_heads,
                               head_dim=head_dim, repeats=repeats, progress=progress)
    flops = int(timing.attention_flops(1, seq_len, seq_len, heads, head_dim, causal=True,
                                       backward=True))
    return [Point("balance", "ring", name, num_shards, heads, kv_heads, seq_len, "fwd+bwd",
                  flops, 0, True, local=registry.DEFAULT_LOCAL, block=blocks[name],
                  seconds=float(t.max(axis=1).sum()), baseline="contiguous")
            for name, t in times.items()]
