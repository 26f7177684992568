"""Single-device attention benchmark: `xla` (dense) against lca `blockwise`.

    python experiments/bench_attention.py [--seq_lens 2048,4096,8192,16384] [--out DIR]

Prints a table (median times, speed-up over xla, GFLOP/s on useful FLOPs,
fraction of the matmul peak measured in the same run, compiled temporary
memory) and writes bench_attention.csv to --out.
"""

import argparse
import os

from lca.bench import attention


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_lens", default="2048,4096,8192,16384")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=None)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--bidirectional", action="store_true", help="no causal mask")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block_q", type=int, default=512)
    parser.add_argument("--block_k", type=int, default=512)
    parser.add_argument("--out", default="out/bench_attention")
    args = parser.parse_args()

    rows, peak = attention.run(
        [int(t) for t in args.seq_lens.split(",")], batch=args.batch, heads=args.heads,
        kv_heads=args.kv_heads, head_dim=args.head_dim, causal=not args.bidirectional,
        dtype=args.dtype, repeats=args.repeats, block_q=args.block_q, block_k=args.block_k)
    print(attention.format_table(rows, peak))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_attention.csv")
    attention.write_csv(rows, peak, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
