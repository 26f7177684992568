"""Generate from a saved checkpoint, through the KV cache, on one device or a mesh.

    python experiments/generate.py --workdir out/passkey                 # a passkey example
    python experiments/generate.py --workdir out/passkey --length 8192 --mesh sequence=8
    python experiments/generate.py --workdir out/text --prompt "def main(" --steps 200

A byte-level (text) model continues --prompt; a passkey model is given a fresh
held-out example of --length tokens (default: the training length) cut after
its question, and generates the key; a recall model, the last value. Greedy by
default; --temperature > 0 samples (--top_k, --seed). --mesh shards the cache
over its sequence axis (default: one device). A progress bar runs over the
generated tokens; the answer, and for retrieval whether it is right, is
printed. A refusal is one line, `error: ...`, and exit status 2.
"""

from absl import flags, logging

from lca.train import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory holding checkpoints/")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
_PROMPT = flags.DEFINE_string("prompt", None, "text prompt (byte-level models)")
_STEPS = flags.DEFINE_integer("steps", None, "tokens to generate (default: 200 for text, the"
                              " answer's length for retrieval)")
_LENGTH = flags.DEFINE_integer("length", None, "retrieval example length (default: training)")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0 samples")
_TOP_K = flags.DEFINE_integer("top_k", None, "sample among the k most likely tokens")
_SEED = flags.DEFINE_integer("seed", 0, "the example's and the sampling's seed")
_MESH = flags.DEFINE_string("mesh", None, "e.g. sequence=8; default one device")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 8, "emulated CPU devices")
flags.mark_flags_as_required(["workdir"])


def _example(exp, length, seed):
    """(prompt [1, T], the true continuation or None) for the run's task."""
    import numpy as np  # noqa: PLC0415

    from lca.data import batch_rng  # noqa: PLC0415
    from lca.train.evaluate import make_task  # noqa: PLC0415

    d = exp.data
    if d.task == "text":
        if _PROMPT.value is None:
            raise ValueError("a text model continues --prompt; give one, e.g."
                             " --prompt 'def main('")
        data = _PROMPT.value.encode()
        if not data:
            raise ValueError("--prompt is empty; give at least one character")
        return np.frombuffer(data, np.uint8).astype(np.int32)[None], None
    if _PROMPT.value is not None:
        raise ValueError(f"this run's task is {d.task!r}: it reads task tokens, not text; drop"
                         " --prompt (a held-out example is generated) or use a text run")
    length = length or d.seq_len
    task = make_task(exp)
    tokens = task.batch(batch_rng(seed, 0, 2), 1, seq_len=length)["tokens"]
    answer = d.key_len if d.task == "passkey" else 1
    return tokens[:, :length - answer], tokens[0, length - answer:]


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax  # noqa: PLC0415 (the CPU device count must be set first)
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    import numpy as np  # noqa: PLC0415

    import lca  # noqa: PLC0415
    from lca.parallel import make_mesh  # noqa: PLC0415

    axes = cli.parse_mesh(_MESH.value)
    mesh = make_mesh(axes) if axes else None
    model, exp, step = lca.load(_WORKDIR.value, _STEP.value, mesh=mesh)
    prompt, truth = _example(exp, _LENGTH.value, _SEED.value)
    steps = _STEPS.value or (200 if truth is None else len(truth))
    where = f"mesh {dict(mesh.shape)}" if mesh is not None else "one device"
    print(f"step {step}: {exp.data.task} model, prompt of {prompt.shape[1]} tokens, {steps}"
          f" to generate on {where}")
    rng = jax.random.key(_SEED.value) if _TEMPERATURE.value > 0 else None
    out = lca.generate(model, prompt, steps, mesh=mesh, temperature=_TEMPERATURE.value,
                       top_k=_TOP_K.value, rng=rng, progress=True)[0]
    if truth is None:
        text = lambda t: bytes(np.asarray(t, np.uint8)).decode(errors="replace")
        print(text(prompt[0]) + "\u2502" + text(out))  # the bar marks where generation starts
        return
    right = np.array_equal(out[:len(truth)], truth)
    print(f"hidden answer: {truth.tolist()}")
    print(f"model says   : {out.tolist()} ({'right' if right else 'wrong'})")


if __name__ == "__main__":
    cli.run(main, config_flag=None)
