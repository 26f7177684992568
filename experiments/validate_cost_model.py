"""Validates tools/cost_model.py against this machine: load balance (timed) and compiled memory.

  python experiments/validate_cost_model.py                 # T=32768, n=8, 6 repeats, ~4 min
  python experiments/validate_cost_model.py --seq_len 16384 --repeats 2

What is compared, and how: `lca/bench/validation.py`. `python experiments/figures.py`
runs the same checks into docs/figures, where docs/cost_model.md's tables come from.
"""

import argparse

import jax

jax.config.update("jax_num_cpu_devices", 8)

from lca.bench import validation  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq_len", type=int, default=32768)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--skip_balance", action="store_true")
    args = parser.parse_args()
    if not args.skip_balance:
        print(validation.format_balance(validation.balance(args.seq_len, args.devices,
                                                           args.repeats)))
    print("compiled temporaries per device, zigzag ring forward+backward, n=8, float32,"
          " heads 4/2, head_dim 64")
    print(validation.format_memory(validation.memory()))


if __name__ == "__main__":
    main()
