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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    import lca.train  # noqa: PLC0415 (JAX must not start before setup_devices)

    exp = lca.train.from_config(_CONFIG.value)
    lca.train.setup_devices(exp)
    result = lca.train.train(exp, _WORKDIR.value, progress=_PROGRESS.value)
    print(lca.train.summary(result, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main)
