"""Train a model from a config file.

    python experiments/train.py --config configs/passkey.py[:variant] --workdir DIR \
        [--config.train.steps=100 ...]

Resumes from the newest checkpoint in DIR. Writes checkpoints/, metrics.jsonl,
tb/ (TensorBoard) and summary.png there, and prints where they are.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, figure)")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
# Multi-process (see lca/parallel/distributed.py): the three settings, or --distributed.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "number of processes (or JAX_NUM_PROCESSES)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's id (or JAX_PROCESS_ID)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "multi-process with settings JAX detects (TPU pod, SLURM)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    import lca.train  # noqa: PLC0415 (JAX must not start before setup_devices)
    from lca.parallel import distributed  # noqa: PLC0415

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           auto=_DISTRIBUTED.value)
    exp = lca.train.from_config(_CONFIG.value)
    lca.train.setup_devices(exp)
    result = lca.train.train(exp, _WORKDIR.value, progress=_PROGRESS.value)
    print(lca.train.summary(result, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main)
