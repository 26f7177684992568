"""Ring attention benchmark: layout load balance, and end to end against `ringattention`.

    python experiments/bench_ring.py [--part balance|e2e|both] [--out DIR]

Load balance (one device): every (step, rank) ring-step kernel of each layout
at n=8, T=32768, causal; prints the critical path per layout and its ratio
to contiguous. End to end (8 emulated CPU devices): causal forward+backward
at T=16384 for lca ring per layout, lca allgather, and the `ringattention`
package (pip install -e '.[bench]'), at heads == kv_heads and with
grouped-query heads. Ratios come from one run; CSVs go to --out.
"""

import argparse
import os

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

from lca.bench import ring  # noqa: E402


def _heads(text):
    return tuple(tuple(int(x) for x in pair.split("/")) for pair in text.split(","))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="both", choices=["balance", "e2e", "both"])
    parser.add_argument("--balance_seq_len", type=int, default=32768)
    parser.add_argument("--balance_heads", type=int, default=2)
    parser.add_argument("--e2e_seq_len", type=int, default=16384)
    parser.add_argument("--e2e_heads", type=_heads, default=((4, 4), (8, 2)),
                        help="heads/kv_heads pairs, e.g. 4/4,8/2")
    parser.add_argument("--layouts", default="contiguous,striped,zigzag")
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=None,
                        help="tile length for every layout (default: each layout's default;"
                             " ringattention's chunks: 512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_check", action="store_true",
                        help="skip the small-size check of every impl against the reference")
    parser.add_argument("--out", default="out/bench_ring")
    args = parser.parse_args()
    names = tuple(args.layouts.split(","))
    os.makedirs(args.out, exist_ok=True)

    if args.part in ("balance", "both"):
        times, blocks = ring.load_balance(
            args.balance_seq_len, 8, names, heads=args.balance_heads,
            kv_heads=args.balance_heads, head_dim=args.head_dim, block=args.block,
            repeats=args.repeats)
        rows = ring.critical_paths(times, blocks)
        print(ring.format_balance(rows, times, args.balance_seq_len, 8))
        ring.write_csv(os.path.join(args.out, "balance.csv"), rows)

    if args.part in ("e2e", "both"):
        if ring.load_ringattention() is None:
            print(ring.RINGATTENTION_MISSING)
        if not args.no_check:
            mesh = ring.make_mesh({"sequence": 8})
            for (impl, layout), err in ring.check_against_reference(mesh).items():
                print(f"check T=256 vs dense float32 reference: {impl:>13} {layout:>10}"
                      f" max relative error {err:.1e}")
        runs, _ = ring.end_to_end(args.e2e_seq_len, args.e2e_heads, names,
                                  head_dim=args.head_dim, block=args.block, repeats=args.repeats)
        print(ring.format_runs(runs, args.e2e_seq_len, 8))
        ring.write_csv(os.path.join(args.out, "end_to_end.csv"), runs)
    print(f"wrote CSVs to {args.out}")


if __name__ == "__main__":
    main()
