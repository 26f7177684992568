"""Train a model from a config file.

    python experiments/train.py --config configs/passkey.py[:variant] --workdir DIR \
        [--config.train.steps=100 ...]

Resumes from the newest checkpoint in DIR. Writes checkpoints/, metrics.jsonl,
tb/ (TensorBoard) and summary.png there, and prints where they are. SIGTERM or
Ctrl-C saves a checkpoint after the current step and exits 0; run the same
command to resume. `--dry_run` checks everything and prints the resolved
config, the mesh and per-device memory (compiling the step to read it), then
exits without writing. A refusal (an option, a value, the mesh, the workdir)
is one line, `error: ...`, and exit status 2 (LCA_TRACEBACK=1 shows the
traceback).
"""

import shlex
import sys

from absl import flags, logging
from ml_collections import config_flags

from lca.train import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, figure)")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "check the config and workdir, print the config,"
                             " mesh and per-device memory, and exit without training or writing")
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
    if _DRY_RUN.value:
        from lca.train import dry_run  # noqa: PLC0415
        print(dry_run.describe(exp, _WORKDIR.value))
        return
    # SIGTERM/SIGINT: the loop saves a checkpoint, says how to resume, and main returns (exit 0).
    command = shlex.join([sys.executable, *sys.argv])
    result = lca.train.train(exp, _WORKDIR.value, progress=_PROGRESS.value, command=command)
    if distributed.is_main_process():  # the files it names are process 0's
        print(lca.train.summary(result, _WORKDIR.value))


if __name__ == "__main__":
    cli.run(main)
