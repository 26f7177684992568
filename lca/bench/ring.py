"""Ring attention benchmarks: load balance of the layouts, and end to end on a CPU mesh.

Load balance: a real mesh waits, at every ring step, for its slowest rank.
On one device we time the real per-step kernels (`ring.step_forward` then
`ring.step_backward`, exactly what the ring runs) for every (step, rank)
pair of a layout and sum, over steps, the slowest rank: the critical path.

End to end: causal forward+backward on the emulated 8-device CPU mesh, lca
`ring` in each layout (arrays already in layout order, as a model holds
them), lca `allgather`, and the `ringattention` package's pure-JAX ring.
The emulated devices share the machine's cores, so these times measure
total work and overheads more than balance; ratios come from one run.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from lca import layouts
from lca.bench import records, timing
from lca.kernels import blockwise, ring
from lca.kernels import masks as masks_lib
from lca.parallel import attention_in_layout, make_mesh
from lca.parallel.sequence import default_block

RINGATTENTION_CHUNK = 512  # its query/key chunk length when --block leaves lca on defaults
RINGATTENTION_MISSING = (
    "the `ringattention` package (0.1.2) is not installed, so its ring is not timed;"
    " install it with: pip install -e '.[bench]'")


def _time(fn, *args, repeats):
    """Median seconds of fn(*args) over `repeats` runs (no warm-up: the caller warms up)."""
    return timing.median_seconds(fn, *args, repeats=repeats, warmup=False)


# ----------------------------------------------------------------------------- load balance


def _step_kernels(shard_len, heads, kv_heads, head_dim, block, causal):
    """Jitted (forward step, backward step) of one device, positions as arguments."""
    shape_q = jax.ShapeDtypeStruct((1, shard_len, heads, head_dim), jnp.float32)
    shape_k = jax.ShapeDtypeStruct((1, shard_len, kv_heads, head_dim), jnp.float32)
    cfg = blockwise.make_config(shape_q, shape_k, causal=causal, window=None, segments=False,
                                scale=None, block_q=block, block_k=block)

    def arrays(q_pos, kv_pos):
        return masks_lib.MaskArrays(q_pos[None], kv_pos[None], None, None)

    @jax.jit
    def forward(q, kv, q_pos, kv_pos, out, lse):
        return ring.step_forward(cfg, q, kv, arrays(q_pos, kv_pos), out, lse)

    @jax.jit
    def backward(q, kv, q_pos, kv_pos, lse, do, delta, dq, dkv):
        return ring.step_backward(cfg, q, kv, arrays(q_pos, kv_pos), lse, do, delta, dq, dkv)

    return forward, backward


def load_balance(seq_len=32768, num_shards=8, layout_names=layouts.LAYOUTS, *, heads=2,
                 kv_heads=2, head_dim=64, block=None, causal=True, repeats=2, seed=0):
    """Seconds [steps, ranks] of one ring step's forward+backward kernels, per layout,
    and the tile length each layout ran with.

    block: tile length; None takes each layout's default
    (`lca.parallel.sequence.default_block`), as `sequence_parallel_attention` does.
    """
    shard_len = seq_len // num_shards
    for name in layout_names:
        layouts.check_layout(seq_len, name, num_shards)
    blocks = {name: block or default_block(name, seq_len, num_shards, heads // kv_heads)
              for name in layout_names}
    kernels = {b: _step_kernels(shard_len, heads, kv_heads, head_dim, b, causal)
               for b in set(blocks.values())}
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, do = normal(1, shard_len, heads, head_dim), normal(1, shard_len, heads, head_dim)
    kv = normal(2, 1, shard_len, kv_heads, head_dim)
    out, dq = jnp.zeros_like(q), jnp.zeros_like(q)
    lse, delta = normal(1, shard_len, heads), normal(1, shard_len, heads)
    dkv = jnp.zeros_like(kv)

    def pair(name, q_pos, kv_pos):
        forward, backward = kernels[blocks[name]]
        a = forward(q, kv, q_pos, kv_pos, out, lse)
        b = backward(q, kv, q_pos, kv_pos, lse, do, delta, dq, dkv)
        return a, b

    shards = {name: jnp.asarray(layouts.shard_positions(seq_len, name, num_shards))
              for name in layout_names}
    for name in layout_names:  # compile once per block size: positions are arguments
        jax.block_until_ready(pair(name, shards[name][0], shards[name][0]))
    points = [(name, s, r) for name in layout_names for s in range(num_shards)
              for r in range(num_shards)]
    samples = {p: [] for p in points}
    # Round-robin over every pair, `repeats` times: load changes hit all layouts alike.
    with tqdm(total=len(points) * repeats, desc="load balance: (layout, step, rank)",
              unit="pair") as bar:
        for _ in range(repeats):
            for name, s, r in points:
                q_pos, kv_pos = shards[name][r], shards[name][(r - s) % num_shards]
                samples[(name, s, r)].append(_time(pair, name, q_pos, kv_pos, repeats=1))
                bar.update()
    # The fastest run estimates the kernel's cost; slower ones add other
    # processes' interference, which the max over ranks would then pick up.
    times = {name: np.zeros((num_shards, num_shards)) for name in layout_names}
    for (name, s, r), t in samples.items():
        times[name][s, r] = min(t)
    return times, blocks


@dataclasses.dataclass
class Balance:
    layout: str
    block: int
    critical_path: float  # sum over steps of the slowest rank, seconds
    total: float          # sum over every (step, rank)
    ideal: float          # total / n: perfect balance
    vs_contiguous: float | None = None


def critical_paths(times, blocks):
    rows = [Balance(name, blocks[name], float(t.max(axis=1).sum()), float(t.sum()),
                    float(t.sum() / t.shape[1])) for name, t in times.items()]
    base = {r.layout: r.critical_path for r in rows}.get("contiguous")
    for r in rows:
        r.vs_contiguous = None if base is None else r.critical_path / base
    return rows


def format_balance(rows, times, seq_len, num_shards):
    lines = [f"load balance: causal, T={seq_len}, n={num_shards}, one ring step's forward+backward"
             " kernels timed per (step, rank) on one device (fastest of the repeats)",
             f"{'layout':>11} {'block':>5} {'critical s':>10} {'x contig':>8} {'ideal s':>8}"
             f" {'total s':>8}  slowest rank per step (s)"]
    for r in rows:
        per_step = " ".join(f"{x:.2f}" for x in times[r.layout].max(axis=1))
        ratio = "" if r.vs_contiguous is None else f"{r.vs_contiguous:.2f}"
        lines.append(f"{r.layout:>11} {r.block:5d} {r.critical_path:10.2f} {ratio:>8}"
                     f" {r.ideal:8.2f} {r.total:8.2f}  {per_step}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- end to end


def load_ringattention():
    """The `ringattention` package's ringattention_jax module, or None when not installed.

    Its package __init__ fails on current JAX (jax.lib.xla_bridge is gone), so
    the module file is loaded on its own.
    """
    try:
        from importlib import metadata
        path = metadata.distribution("ringattention").locate_file(
            "ringattention/ringattention_jax.py")
    except metadata.PackageNotFoundError:
        return None
    spec = importlib.util.spec_from_file_location("ringattention_jax", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ringattention_fn(module, mesh, axis, causal, block, groups):
    """Natural-order (q, k, v) -> out through the package's ring; K/V repeated for GQA."""
    options = dict(causal_block_size=1 if causal else None, query_chunk_size=block,
                   key_chunk_size=block, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
                   dtype=jnp.float32, policy=jax.checkpoint_policies.nothing_saveable,
                   precision=None, prevent_cse=True)

    def per_shard(q, k, v):
        return module.ring_attention(q, k, v, None, None, None, axis, True, options)

    spec = P(None, axis)
    sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                            check_vma=False)

    def fn(q, k, v):
        if groups > 1:  # no grouped-query heads: K/V repeated in memory, on the wire
            k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        return sharded(q, k, v)

    return fn


@dataclasses.dataclass
class Run:
    impl: str
    layout: str
    heads: int
    kv_heads: int
    seconds: float
    vs_ringattention: float | None = None


def lca_fn(mesh, axis, impl, layout, causal, block):
    blocks = {} if block is None else {"block_q": block, "block_k": block}
    return functools.partial(attention_in_layout, mesh=mesh, axis=axis, impl=impl,
                             layout=layout, causal=causal, **blocks)


def _candidates(mesh, axis, layout_names, causal, block, groups, module, shard_len):
    """(impl, layout, fn taking layout-order arrays) for every implementation timed."""
    out = [("ring", name, lca_fn(mesh, axis, "ring", name, causal, block))
           for name in layout_names]
    out.append(("allgather", "zigzag", lca_fn(mesh, axis, "allgather", "zigzag", causal, block)))
    if module is not None:
        out.append(("ringattention", "contiguous",
                    ringattention_fn(module, mesh, axis, causal,
                                      min(block or RINGATTENTION_CHUNK, shard_len), groups)))
    return out


def _step(fn):
    def loss(q, k, v, ct):
        return (fn(q, k, v).astype(jnp.float32) * ct).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def check_against_reference(mesh, axis="sequence", *, seq_len=256, heads=4, kv_heads=2,
                            head_dim=16, layout_names=layouts.LAYOUTS, causal=True, block=16,
                            seed=0):
    """Max relative output error of every timed implementation at a small size.

    Against the dense float64 reference (float32 inputs to the implementations).
    """
    import lca  # the dense reference

    module = load_ringattention()
    n = mesh.shape[axis]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, seq_len, heads, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((1, seq_len, kv_heads, head_dim)).astype(np.float32)
            for _ in range(2))
    with jax.enable_x64(True):
        ref = np.asarray(lca.attention(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)),
                                       impl="reference", causal=causal))
    errors = {}
    for impl, name, fn in _candidates(mesh, axis, layout_names, causal, block,
                                      heads // kv_heads, module, seq_len // n):
        perm = lambda x: jnp.asarray(layouts.permute(x, name, n), jnp.float32)
        got = layouts.unpermute(np.asarray(jax.jit(fn)(perm(q), perm(k), perm(v))), name, n)
        errors[(impl, name)] = float(np.abs(got - ref).max() / np.abs(ref).max())
    return errors


def end_to_end(seq_len=16384, head_configs=((4, 4), (8, 2)), layout_names=layouts.LAYOUTS, *,
               num_devices=8, head_dim=64, causal=True, block=None, repeats=3, seed=0):
    """Forward+backward seconds of every implementation and head configuration.

    Per head configuration, every implementation is compiled and warmed up,
    then the timed runs go round-robin over the implementations, so a load
    change on a shared machine hits them alike.
    """
    axis = "sequence"
    mesh = make_mesh({axis: num_devices}, devices=jax.devices()[:num_devices])
    module = load_ringattention()
    sharding = NamedSharding(mesh, P(None, axis))
    rng = np.random.default_rng(seed)
    runs = []
    total = sum(len(_candidates(mesh, axis, layout_names, causal, block, h // kh, module, 1))
                for h, kh in head_configs) * (repeats + 1)
    bar = tqdm(total=total, desc="end to end: forward+backward", unit="run")
    for heads, kv_heads in head_configs:
        normal = lambda h: jax.device_put(jnp.asarray(
            rng.standard_normal((1, seq_len, h, head_dim)), jnp.float32), sharding)
        q, k, v, ct = normal(heads), normal(kv_heads), normal(kv_heads), normal(heads)
        steps = {}
        for impl, name, fn in _candidates(mesh, axis, layout_names, causal, block,
                                          heads // kv_heads, module, seq_len // num_devices):
            steps[impl, name] = (_step(fn).lower(q, k, v, ct).compile(), (q, k, v, ct))
            bar.update()
        times = timing.round_robin(steps, repeats, min_seconds=0.0,
                                   on_round=lambda: bar.update(len(steps)))
        runs += [Run(impl, name, heads, kv_heads, median)
                 for (impl, name), (median, _, _) in times.items()]
        del steps, q, k, v, ct
    bar.close()
    for r in runs:
        base = [x.seconds for x in runs if x.impl == "ringattention"
                and (x.heads, x.kv_heads) == (r.heads, r.kv_heads)]
        r.vs_ringattention = r.seconds / base[0] if base else None
    return runs, module is not None


def format_runs(runs, seq_len, num_devices):
    lines = [f"end to end: causal forward+backward, T={seq_len}, {num_devices}-device CPU mesh,"
             " median of the same run",
             f"{'impl':>14} {'layout':>11} {'heads/kv':>8} {'seconds':>8} {'x ringattention':>15}"]
    for r in runs:
        ratio = "" if r.vs_ringattention is None else f"{r.vs_ringattention:.2f}"
        lines.append(f"{r.impl:>14} {r.layout:>11} {f'{r.heads}/{r.kv_heads}':>8}"
                     f" {r.seconds:8.2f} {ratio:>15}")
    return "\n".join(lines)


def write_csv(path, rows):
    records.write_csv(path, rows)
