"""Linear attention benchmarks: time per token against length, the efficiency length, and
sequence parallelism at a million tokens.

Every point is forward+backward (gradients of q, k, v and the decay), batch
1, float32. Each point is compiled first and its compiled memory read; a
point that would not fit the memory budget is reported as such instead of
run. Points that are compared are timed round-robin in the same run (one
repeat of every point, then the next repeat), so load from other processes
falls on all of them alike; reported figures are medians and ratios.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

import lca
from lca.bench import records, timing
from lca.parallel import make_mesh
from lca.parallel.linear import attention_in_layout_linear


@dataclasses.dataclass
class Row:
    part: str            # "length", "efficiency" or "sequence_parallel"
    impl: str            # "linear", "blockwise", or "linear/<algorithm>"
    seq_len: int
    seconds: float | None  # median forward+backward; None: did not fit
    us_per_token: float | None
    temp_bytes: int
    ratio: float | None = None   # length: vs the reference length; efficiency: linear / blockwise
    collective_bytes: int | None = None  # sequence parallel: collective results, per device


def _inputs(seq_len, heads, head_dim, decay, seed=0, sharding=None):
    rng = np.random.default_rng(seed)
    shape = (1, seq_len, heads, head_dim)
    put = (lambda x: jax.device_put(x, sharding)) if sharding is not None else jnp.asarray
    q, k, v = (put(rng.standard_normal(shape, np.float32)) for _ in range(3))
    if decay == "none":
        return q, k, v
    if decay == "head":
        return q, k, v, jnp.asarray(-rng.uniform(0.001, 0.1, heads), jnp.float32)
    g = -rng.uniform(0.0, 0.2, (1, seq_len, heads)).astype(np.float32)
    g_sharding = None if sharding is None else NamedSharding(sharding.mesh, P(None, "sequence"))
    return q, k, v, (jax.device_put(g, g_sharding) if g_sharding else jnp.asarray(g))


def _forward_backward(attend):
    def loss(*args):
        return attend(*args).sum()

    return jax.jit(lambda *args: jax.grad(loss, argnums=tuple(range(len(args))))(*args))


def _linear(chunk_size):
    return _forward_backward(lambda q, k, v, g=None: lca.linear_attention(
        q, k, v, log_decay=g, chunk_size=chunk_size))


def _blockwise(block):
    return _forward_backward(lambda q, k, v, g=None: lca.attention(
        q, k, v, impl="blockwise", causal=True, block_q=block, block_k=block))


def _compile(fn, args, budget):
    """(compiled, temp bytes, fits): fits when its temporaries and outputs fit the budget."""
    compiled = fn.lower(*args).compile()
    memory = compiled.memory_analysis()
    need = memory.temp_size_in_bytes + memory.output_size_in_bytes
    return compiled, memory.temp_size_in_bytes, need <= budget


def _round_robin(points, repeats, desc, min_seconds=0.25):
    """{key: median seconds per call}; points: {key: (compiled, args)}; see timing.round_robin."""
    with tqdm(total=repeats, desc=desc, unit="round") as bar:
        times = timing.round_robin(points, repeats, min_seconds=min_seconds,
                                   on_round=bar.update)
    return {key: median for key, (median, _, _) in times.items()}


def _budget(memory_budget):
    return memory_budget or int(0.6 * timing.available_memory_bytes())


def time_per_token(seq_lens=(4096, 16384, 65536, 262144, 1048576), *, reference_len=16384,
                   heads=4, head_dim=64, decay="token", chunk_size=64, repeats=3,
                   memory_budget=None):
    """Forward+backward seconds per token at each length; ratio to `reference_len`."""
    budget = _budget(memory_budget)
    points, rows = {}, {}
    for seq_len in tqdm(seq_lens, desc="compile (length)", unit="point"):
        args = _inputs(seq_len, heads, head_dim, decay)
        compiled, temp, fits = _compile(_linear(chunk_size), args, budget)
        rows[seq_len] = Row("length", "linear", seq_len, None, None, temp)
        if fits:
            points[seq_len] = (compiled, args)
    for seq_len, seconds in _round_robin(points, repeats, "time per token").items():
        rows[seq_len].seconds, rows[seq_len].us_per_token = seconds, 1e6 * seconds / seq_len
    base = rows.get(reference_len)
    for row in rows.values():
        if base is not None and base.us_per_token and row.us_per_token:
            row.ratio = row.us_per_token / base.us_per_token
    return list(rows.values())


def efficiency_length(seq_lens=(64, 128, 256, 512, 1024, 2048, 4096), *, heads=4,
                      head_dim=64, decay="token", chunk_size=64, block=512, repeats=5,
                      memory_budget=None):
    """Linear against blockwise softmax attention; (rows, efficiency length or None).

    The efficiency length is the shortest measured length from which linear
    attention is at least as fast as blockwise at every longer measured length.
    """
    budget = _budget(memory_budget)
    points, rows = {}, {}
    for seq_len in tqdm(seq_lens, desc="compile (efficiency)", unit="length"):
        for impl, fn in (("linear", _linear(chunk_size)), ("blockwise", _blockwise(block))):
            args = _inputs(seq_len, heads, head_dim, decay if impl == "linear" else "none")
            compiled, temp, fits = _compile(fn, args, budget)
            rows[impl, seq_len] = Row("efficiency", impl, seq_len, None, None, temp)
            if fits:
                points[impl, seq_len] = (compiled, args)
    for key, seconds in _round_robin(points, repeats, "linear vs blockwise").items():
        rows[key].seconds, rows[key].us_per_token = seconds, 1e6 * seconds / key[1]
    for seq_len in seq_lens:
        lin, soft = rows["linear", seq_len].seconds, rows["blockwise", seq_len].seconds
        if lin is not None and soft is not None:
            rows["linear", seq_len].ratio = lin / soft
    length = None
    for seq_len in sorted(seq_lens, reverse=True):
        ratio = rows["linear", seq_len].ratio
        if ratio is None or ratio > 1:
            break
        length = seq_len
    return list(rows.values()), length


def _collective_bytes(hlo_text):
    """Bytes of every collective's result in compiled HLO text, summed (one device)."""
    sizes = {"f32": 4, "f64": 8, "bf16": 2, "s32": 4}
    ops = "all-gather|collective-permute|all-reduce|reduce-scatter|all-to-all"
    total = 0
    for dtype, dims in re.findall(rf"= (\w+)\[([\d,]*)\]\S* (?:{ops})(?:-start)?\(", hlo_text):
        total += int(np.prod([int(d) for d in dims.split(",") if d])) * sizes[dtype]
    return total


def sequence_parallel(seq_len=1048576, algorithms=("ring", "allgather", "doubling"), *,
                      num_devices=8, layout="contiguous", heads=4, head_dim=64, decay="token",
                      chunk_size=64, repeats=2, memory_budget=None):
    """Forward+backward of each algorithm on a `num_devices` mesh (needs that many devices)."""
    mesh = make_mesh({"sequence": num_devices}, devices=jax.devices()[:num_devices])
    sharding = NamedSharding(mesh, P(None, "sequence"))
    args = _inputs(seq_len, heads, head_dim, decay, sharding=sharding)
    # The inputs are already resident; what is left must hold temporaries and outputs.
    budget = memory_budget or int(0.75 * timing.available_memory_bytes())
    points, rows = {}, {}
    for algorithm in tqdm(algorithms, desc="compile (sequence parallel)", unit="algorithm"):
        fn = _forward_backward(lambda q, k, v, g=None, a=algorithm: attention_in_layout_linear(
            q, k, v, mesh=mesh, layout=layout, algorithm=a, log_decay=g, chunk_size=chunk_size))
        compiled, temp, fits = _compile(fn, args, budget)
        rows[algorithm] = Row("sequence_parallel", f"linear/{algorithm}", seq_len, None, None,
                              temp, collective_bytes=_collective_bytes(compiled.as_text()))
        if fits:
            points[algorithm] = (compiled, args)
    for algorithm, seconds in _round_robin(points, repeats, "sequence parallel").items():
        rows[algorithm].seconds = seconds
        rows[algorithm].us_per_token = 1e6 * seconds / seq_len
    return list(rows.values())


def format_table(rows) -> str:
    lines = [f"{'part':>17} {'impl':>16} {'T':>8} {'median s':>9} {'us/token':>9} {'ratio':>6}"
             f" {'temp MiB':>9} {'coll. B':>8}"]
    for r in rows:
        mib = f"{r.temp_bytes / 2**20:9.1f}"
        coll = "" if r.collective_bytes is None else str(r.collective_bytes)
        if r.seconds is None:
            lines.append(f"{r.part:>17} {r.impl:>16} {r.seq_len:>8} {'does not fit':>26} {mib}")
            continue
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"{r.part:>17} {r.impl:>16} {r.seq_len:>8} {r.seconds:9.3f}"
                     f" {r.us_per_token:9.2f} {ratio:>6} {mib} {coll:>8}")
    if any(r.part == "sequence_parallel" for r in rows):
        lines.append("sequence_parallel: temp MiB and collective bytes (coll. B: the results of"
                     " every collective in forward+backward) are per device")
    return "\n".join(lines)


def write_csv(rows, path):
    records.write_csv(path, rows)
