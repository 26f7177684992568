"""Evaluate a saved checkpoint on any mesh.

    python experiments/evaluate.py --workdir DIR [--step N] [--mesh data=1,sequence=8]
    python experiments/evaluate.py --workdir out/passkey --generate   # + generated answers

Prints the run's metrics (held-out accuracy by length and depth for passkey
and recall, validation loss and bits per byte for text) and writes them to
DIR/eval_<step>.json. The default mesh is the checkpoint's own when the
devices match, else one device; the mesh used is printed first. With
--generate (passkey), the answer is also generated through the KV cache at
--generate_multiples of the training length (default 1, 2, 4, 8), on a mesh
of every device on the sequence axis (the cache sharded 8 ways); those
accuracies are appended to DIR/metrics.jsonl and drawn in DIR/summary.png.
A refusal is one line, `error: ...`, and exit status 2.
"""

import json
import os

from absl import flags, logging

from lca.train import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory holding checkpoints/")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
_MESH = flags.DEFINE_string("mesh", None, "e.g. data=2,sequence=4; default: see above")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 8, "emulated CPU devices")
_GENERATE = flags.DEFINE_bool("generate", False, "also score passkey answers generated through"
                              " the KV cache")
_MULTIPLES = flags.DEFINE_list("generate_multiples", ["1", "2", "4", "8"],
                               "multiples of the training length to generate at")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax  # noqa: PLC0415 (the CPU device count must be set first)
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    from lca.train import evaluate_checkpoint  # noqa: PLC0415
    from lca.train.metrics import MetricsWriter  # noqa: PLC0415
    from lca.train.plots import plot_run  # noqa: PLC0415

    multiples = [float(m) for m in _MULTIPLES.value] if _GENERATE.value else ()
    step, metrics = evaluate_checkpoint(_WORKDIR.value, step=_STEP.value,
                                        mesh_axes=cli.parse_mesh(_MESH.value), log=print,
                                        generate_multiples=multiples)
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}")
    path = os.path.join(_WORKDIR.value, f"eval_{step}.json")
    with open(path, "w") as f:
        json.dump({"step": step, **metrics}, f, indent=1)
    print(f"wrote {path}")
    generated = {k: v for k, v in metrics.items() if k.startswith("eval/generated_")}
    if generated:
        writer = MetricsWriter(_WORKDIR.value, tensorboard=False)
        writer.write(step, generated)
        writer.close()
        print(f"appended to {writer.path}; figure {plot_run(_WORKDIR.value)}")


if __name__ == "__main__":
    cli.run(main, config_flag=None)
