"""The cost model against this machine: load balance (timed) and compiled memory.

    python experiments/validate_cost_model.py [--seq_len 32768] [--repeats 6]
    python experiments/figures.py           # writes the CSVs below into docs/figures

1. Load balance: `lca.bench.ring.load_balance` times one ring step's
   forward+backward kernels for every (step, rank) of each layout on one
   device; the critical path is the sum over steps of the slowest rank. The
   model (`tools/cost_model.py`) predicts each layout's critical path
   relative to contiguous from FLOPs alone (every MASKED or FULL tile costs
   the same). The issue's target: within 15%.
2. Memory: compiled temporary bytes per device of a zigzag ring
   forward+backward (float32, heads 4/2, head_dim 64, n=8, the configuration
   of tests/test_ring_compiled.py) against the model's estimate.

Exact FLOP and byte equality with the compiled HLO is asserted by
tests/test_cost_model.py, not here.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lca import layouts
from lca.bench import figures, records
from lca.bench import ring as ring_bench
from lca.parallel import attention_in_layout, make_mesh

BALANCE_CSV = "cost_validation_balance.csv"
MEMORY_CSV = "cost_validation_memory.csv"


def load_cost_model():
    """tools/cost_model.py as a module (a NumPy-only tool, not part of the package)."""
    return figures.load_module(os.path.join("tools", "cost_model.py"))


@dataclasses.dataclass
class BalanceCheck:
    layout: str
    seq_len: int
    num_shards: int
    block: int
    critical_path_s: float        # measured: sum over steps of the slowest rank
    measured_vs_contiguous: float
    predicted_tiles: float        # the model's critical path, in tiles of this layout's block
    predicted_vs_contiguous: float

    @property
    def difference(self) -> float:
        """predicted / measured - 1."""
        return self.predicted_vs_contiguous / self.measured_vs_contiguous - 1


@dataclasses.dataclass
class MemoryCheck:
    seq_len: int
    num_shards: int
    compiled_bytes: int           # temporaries per device, from the compiled executable
    model_bytes: int


def balance(seq_len=32768, num_shards=8, repeats=6, heads=2, kv_heads=2, head_dim=64):
    """Measured and predicted critical paths per layout (one device, timed)."""
    cm = load_cost_model()
    times, blocks = ring_bench.load_balance(seq_len, num_shards, heads=heads, kv_heads=kv_heads,
                                            head_dim=head_dim, repeats=repeats)
    measured = {r.layout: r for r in ring_bench.critical_paths(times, blocks)}
    flops, tiles = {}, {}
    for name in layouts.LAYOUTS:
        problem = cm.Problem("ring", name, seq_len, heads, kv_heads, head_dim, num_shards,
                             itemsize=4)
        f, b = cm.step_flops(problem)
        bq, bk = problem.blocks()
        flops[name] = float((f + b).max(1).sum())
        tiles[name] = flops[name] / (14 * heads * bq * bk * head_dim)  # 4 fwd + 10 bwd per tile
    return [BalanceCheck(name, seq_len, num_shards, measured[name].block,
                         measured[name].critical_path, measured[name].vs_contiguous,
                         tiles[name], flops[name] / flops["contiguous"])
            for name in layouts.LAYOUTS]


def memory(lengths=(8192, 16384), num_shards=8):
    """Compiled and predicted temporaries per device of a zigzag ring forward+backward."""
    cm = load_cost_model()
    mesh = make_mesh({"sequence": num_shards}, devices=jax.devices()[:num_shards])
    seq = NamedSharding(mesh, P(None, "sequence"))
    rows = []
    for seq_len in lengths:
        q = jax.ShapeDtypeStruct((1, seq_len, 4, 64), jnp.float32, sharding=seq)
        kv = jax.ShapeDtypeStruct((1, seq_len, 2, 64), jnp.float32, sharding=seq)

        def run(q, k, v, ct):
            out, vjp = jax.vjp(lambda q, k, v: attention_in_layout(
                q, k, v, mesh=mesh, causal=True, layout="zigzag"), q, k, v)
            return (out, *vjp(ct))

        compiled = jax.jit(run).lower(q, kv, kv, q).compile()
        model = cm.memory_bytes(cm.Problem("ring", "zigzag", seq_len, 4, 2, 64, num_shards,
                                           itemsize=4))["temporaries"]
        rows.append(MemoryCheck(seq_len, num_shards,
                                compiled.memory_analysis().temp_size_in_bytes, int(model)))
    return rows


def format_balance(rows) -> str:
    lines = [f"{'layout':>11} {'critical s':>10} {'measured x contig':>17}"
             f" {'predicted x contig':>18} {'difference':>10}"]
    for r in rows:
        lines.append(f"{r.layout:>11} {r.critical_path_s:10.2f} {r.measured_vs_contiguous:17.3f}"
                     f" {r.predicted_vs_contiguous:18.3f} {100 * r.difference:+9.1f}%")
    return "\n".join(lines)


def format_memory(rows) -> str:
    lines = [f"{'T':>6} {'compiled MiB':>12} {'model MiB':>10} {'model / compiled':>16}"]
    for r in rows:
        lines.append(f"{r.seq_len:>6} {r.compiled_bytes / 2**20:12.1f}"
                     f" {r.model_bytes / 2**20:10.1f} {r.model_bytes / r.compiled_bytes:16.2f}")
    return "\n".join(lines)


def write_validation(out_dir, quick=False):
    """Figure producer: both checks into out_dir (quick: T=8192, 2 repeats, 4 min -> 20 s)."""
    rows = balance(8192, repeats=2) if quick else balance()
    print(format_balance(rows))
    records.write_csv(os.path.join(out_dir, BALANCE_CSV), rows)
    rows = memory()
    print(format_memory(rows))
    records.write_csv(os.path.join(out_dir, MEMORY_CSV), rows)
