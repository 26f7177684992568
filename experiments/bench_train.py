"""Training-step benchmark of the default model: ring vs xla speed, and context that fits.

    python experiments/bench_train.py [--config configs/passkey.py] [--seq_len 16384]
        [--speed_mesh sequence=8] [--budget_gib 20] [--out out/bench_train]

Part 1 (speed): global training tokens per second of the config's model at
--seq_len with `ring` (zigzag layout) and `xla` (natural layout), same mesh,
same batch (one sequence per data replica), same run; prints the ratio.
Part 2 (memory): for xla, blockwise, ring and linear, the longest context at
which one training step fits in --budget_gib per device on the config's own
mesh, from compiled memory analysis (nothing is run). Writes
bench_train.json to --out.
"""

from absl import app, flags, logging

_CONFIG = flags.DEFINE_string("config", "configs/passkey.py", "config file[:variant]")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 16384, "length for the speed comparison")
_SPEED_MESH = flags.DEFINE_string("speed_mesh", "sequence=8", "mesh for the speed comparison")
_SPEED_KERNELS = flags.DEFINE_list("speed_kernels", ["ring", "xla"], "first is the numerator")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per kernel (after one warm-up)")
_MEMORY_KERNELS = flags.DEFINE_list("memory_kernels", ["xla", "blockwise", "ring", "linear"],
                                    "kernels for the longest-context search ([] to skip)")
_BUDGET = flags.DEFINE_float("budget_gib", 20.0, "per-device memory budget")
_OUT = flags.DEFINE_string("out", "out/bench_train", "output directory")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax  # noqa: PLC0415 (the CPU device count must be set first)
    jax.config.update("jax_num_cpu_devices", 8)
    from lca.bench import train_report  # noqa: PLC0415

    mesh = {k: int(v) for k, v in (p.split("=") for p in _SPEED_MESH.value.split(","))}
    train_report.run(_CONFIG.value, seq_len=_SEQ_LEN.value, speed_mesh=mesh,
                     speed_kernels=_SPEED_KERNELS.value, steps=_STEPS.value,
                     memory_kernels=_MEMORY_KERNELS.value, budget_gib=_BUDGET.value,
                     out=_OUT.value)


if __name__ == "__main__":
    app.run(main)
