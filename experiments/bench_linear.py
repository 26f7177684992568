"""Linear attention benchmark: time per token against length, efficiency length, sequence parallel.

    python experiments/bench_linear.py [--part length|efficiency|sequence_parallel|all] [--out DIR]

Forward+backward, batch 1, 4 heads, head_dim 64, float32, per-token decay.
`length`: time per token for T = 4096 ... 1,048,576 on one device and its
ratio to T = 16384 (target: <= 1.3 at 1,048,576). `efficiency`: the shortest
length from which linear attention is faster than blockwise softmax
attention (target: <= 2048). `sequence_parallel`: T = 1,048,576 on 8
emulated CPU devices for each algorithm; with --part all it runs in a
subprocess that sets 8 devices before JAX starts. Ratios come from one run;
CSVs go to --out.
"""

import argparse
import os
import subprocess
import sys


def _ints(text):
    return tuple(int(x) for x in text.split(","))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all",
                        choices=["length", "efficiency", "sequence_parallel", "all"])
    parser.add_argument("--seq_lens", type=_ints, default=(4096, 16384, 65536, 262144, 1048576))
    parser.add_argument("--efficiency_lens", type=_ints,
                        default=(64, 128, 256, 512, 1024, 2048, 4096))
    parser.add_argument("--parallel_seq_len", type=int, default=1048576)
    parser.add_argument("--algorithms", default="ring,allgather,doubling")
    parser.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"])
    parser.add_argument("--decay", default="token", choices=["none", "head", "token"])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--chunk_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="out/bench_linear")
    args = parser.parse_args()

    if args.part == "sequence_parallel":
        import jax  # noqa: PLC0415 -- 8 devices must be set before JAX starts

        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", 8)
    from lca.bench import linear  # noqa: PLC0415

    os.makedirs(args.out, exist_ok=True)
    shape = {"heads": args.heads, "head_dim": args.head_dim, "decay": args.decay,
             "chunk_size": args.chunk_size}
    if args.part in ("length", "all"):
        rows = linear.time_per_token(args.seq_lens, repeats=args.repeats, **shape)
        print(linear.format_table(rows))
        linear.write_csv(rows, os.path.join(args.out, "length.csv"))
    if args.part in ("efficiency", "all"):
        rows, length = linear.efficiency_length(args.efficiency_lens,
                                                repeats=max(args.repeats, 5), **shape)
        print(linear.format_table(rows))
        print(f"efficiency length (linear at least as fast as blockwise from here on):"
              f" {length if length is not None else 'not reached'}")
        linear.write_csv(rows, os.path.join(args.out, "efficiency.csv"))
    if args.part == "sequence_parallel":
        rows = linear.sequence_parallel(args.parallel_seq_len, tuple(args.algorithms.split(",")),
                                        layout=args.layout, repeats=max(1, args.repeats - 1),
                                        **shape)
        print(linear.format_table(rows))
        linear.write_csv(rows, os.path.join(args.out, "sequence_parallel.csv"))
    if args.part == "all":
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--part", "sequence_parallel"],
                       check=True)
    print(f"wrote CSVs to {args.out}")


if __name__ == "__main__":
    main()
