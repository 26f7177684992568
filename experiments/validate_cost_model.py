"""Validates tools/cost_model.py against this machine: load balance (timed) and compiled memory.

  python experiments/validate_cost_model.py                       # T=32768, n=8, 2 repeats
  python experiments/validate_cost_model.py --seq_len 16384 --repeats 1

1. Load balance: `lca.bench.ring.load_balance` times one ring step's
   forward+backward kernels for every (step, rank) of each layout on one
   device; the critical path is the sum over steps of the slowest rank. The
   model predicts each layout's critical path relative to contiguous from
   FLOPs alone (every MASKED or FULL tile costs the same); printed side by
   side, with the relative difference (the target: within 15%).
2. Memory: the compiled temporary bytes per device of a zigzag ring
   forward+backward (float32, heads 4/2, head_dim 64, n=8, the configuration
   of tests/test_ring_compiled.py) against the model's estimate.
(Exact FLOP and byte equality with the compiled HLO is asserted by tests/test_cost_model.py.)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lca import layouts  # noqa: E402
from lca.bench import ring as ring_bench  # noqa: E402
from lca.parallel import attention_in_layout, make_mesh  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_cost_model():
    spec = importlib.util.spec_from_file_location("cost_model",
                                                  os.path.join(REPO, "tools", "cost_model.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["cost_model"] = module
    spec.loader.exec_module(module)
    return module


def balance(cm, seq_len, num_shards, repeats, heads=2, kv_heads=2, head_dim=64):
    times, blocks = ring_bench.load_balance(seq_len, num_shards, heads=heads, kv_heads=kv_heads,
                                            head_dim=head_dim, repeats=repeats)
    rows = ring_bench.critical_paths(times, blocks)
    print(ring_bench.format_balance(rows, times, seq_len, num_shards))
    predicted = {}
    for name in layouts.LAYOUTS:
        f, b = cm.step_flops(cm.Problem("ring", name, seq_len, heads, kv_heads, head_dim,
                                        num_shards, itemsize=4))
        predicted[name] = float((f + b).max(1).sum())
    print(f"\n{'layout':>11} {'measured x contig':>17} {'predicted x contig':>18}"
          f" {'difference':>10}")
    for r in rows:
        pred = predicted[r.layout] / predicted["contiguous"]
        print(f"{r.layout:>11} {r.vs_contiguous:17.3f} {pred:18.3f}"
              f" {100 * (pred / r.vs_contiguous - 1):+9.1f}%")


def memory(cm, lengths=(8192, 16384), num_shards=8):
    mesh = make_mesh({"sequence": num_shards}, devices=jax.devices()[:num_shards])
    seq = NamedSharding(mesh, P(None, "sequence"))
    print(f"\ncompiled temporaries per device, zigzag ring forward+backward, n={num_shards},"
          " float32, heads 4/2, head_dim 64")
    print(f"{'T':>6} {'compiled MiB':>12} {'model MiB':>10} {'model / compiled':>16}")
    for seq_len in lengths:
        q = jax.ShapeDtypeStruct((1, seq_len, 4, 64), jnp.float32, sharding=seq)
        kv = jax.ShapeDtypeStruct((1, seq_len, 2, 64), jnp.float32, sharding=seq)

        def run(q, k, v, ct):
            out, vjp = jax.vjp(lambda q, k, v: attention_in_layout(
                q, k, v, mesh=mesh, causal=True, layout="zigzag"), q, k, v)
            return (out, *vjp(ct))

        compiled = jax.jit(run).lower(q, kv, kv, q).compile()
        got = compiled.memory_analysis().temp_size_in_bytes
        model = cm.memory_bytes(cm.Problem("ring", "zigzag", seq_len, 4, 2, 64, num_shards,
                                           itemsize=4))["temporaries"]
        print(f"{seq_len:>6} {got / 2**20:12.1f} {model / 2**20:10.1f} {model / got:16.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq_len", type=int, default=32768)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip_balance", action="store_true")
    args = parser.parse_args()
    cm = load_cost_model()
    if not args.skip_balance:
        balance(cm, args.seq_len, args.devices, args.repeats)
    memory(cm)


if __name__ == "__main__":
    main()
