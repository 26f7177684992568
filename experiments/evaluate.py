"""Evaluate a saved checkpoint on any mesh.

    python experiments/evaluate.py --workdir DIR [--step N] [--mesh data=1,sequence=8]

Prints the run's metrics (held-out accuracy by length and depth for passkey
and recall, validation loss and bits per byte for text) and writes them to
DIR/eval_<step>.json. The default mesh is the checkpoint's own when the
devices match, else one device; the mesh used is printed first. A refusal is
one line, `error: ...`, and exit status 2.
"""

import json
import os

from absl import flags, logging

from lca.train import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory holding checkpoints/")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
_MESH = flags.DEFINE_string("mesh", None, "e.g. data=2,sequence=4; default: see above")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 8, "emulated CPU devices")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax  # noqa: PLC0415 (the CPU device count must be set first)
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    from lca.train import evaluate_checkpoint  # noqa: PLC0415

    step, metrics = evaluate_checkpoint(_WORKDIR.value, step=_STEP.value,
                                        mesh_axes=cli.parse_mesh(_MESH.value), log=print)
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}")
    path = os.path.join(_WORKDIR.value, f"eval_{step}.json")
    with open(path, "w") as f:
        json.dump({"step": step, **metrics}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main, config_flag=None)
