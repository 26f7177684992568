"""The run's figure: training loss curve and accuracy by depth (or validation loss), and
passkey accuracy by context length when the answers were generated
(`experiments/evaluate.py --generate`)."""

from __future__ import annotations

import os

from lca.train import metrics as metrics_lib


def plot_run(workdir: str, path: str | None = None) -> str:
    """Writes `<workdir>/summary.png` from metrics.jsonl; returns its path.

    In a multi-process run only process 0 draws; the others return the path.
    """
    import jax
    path = path or os.path.join(workdir, "summary.png")
    if jax.process_index() != 0:
        return path
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = metrics_lib.read(workdir)
    train = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    generated = [r for r in records if any(k.startswith("eval/generated_") for k in r)]
    evals = [r for r in records if any(k.startswith("eval/") for k in r) and r not in generated]
    fig, axes = plt.subplots(1, 3 if generated else 2, figsize=(16.5 if generated else 11, 4))
    ax0, ax1 = axes[:2]
    steps = sorted(train)
    ax0.plot(steps, [train[s] for s in steps], label="train")
    if evals and "eval/loss" in evals[-1]:
        ax0.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-",
                 label="validation")
    ax0.set(xlabel="step", ylabel="loss (nats / token)", yscale="log", title="loss")
    ax0.legend()
    last = evals[-1] if evals else {}
    depth = sorted((float(k.rsplit("/", 1)[1]), v) for k, v in last.items()
                   if k.startswith("eval/accuracy_depth/"))
    if depth:
        width = depth[1][0] - depth[0][0] if len(depth) > 1 else 0.1
        bars = ax1.bar([d + width / 2 for d, _ in depth], [v for _, v in depth],
                       width=width * 0.9, edgecolor="black")  # a zero bar still shows
        ax1.bar_label(bars, labels=[f"{v:.0%}" for _, v in depth], fontsize=7)
        ax1.set(xlabel="depth of the key in the context", ylabel="accuracy", ylim=(0, 1.02),
                title=f"held-out accuracy by depth (step {last['step']},"
                      f" mean {last.get('eval/accuracy', float('nan')):.1%})")
    elif evals and "eval/bits_per_byte" in last:
        ax1.plot([r["step"] for r in evals], [r["eval/bits_per_byte"] for r in evals], "o-")
        ax1.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    if generated:
        _plot_lengths(axes[2], generated[-1], last)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _lengths(record, prefix):
    return sorted((int(k.rsplit("@", 1)[1]), v) for k, v in record.items()
                  if k.startswith(prefix + "@"))


def _plot_lengths(ax, generated, scored):
    import matplotlib.ticker  # noqa: PLC0415 (matplotlib only when drawing)
    """Generated passkey accuracy against context length, beside the scored (teacher-forced)
    accuracies of the last periodic evaluation."""
    gen = _lengths(generated, "eval/generated_accuracy")
    ax.plot([n for n, _ in gen], [v for _, v in gen], "o-", label="generated (KV cache)")
    for n, v in gen:
        ax.annotate(f"{v:.0%}", (n, v), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7)
    forced = _lengths(scored, "eval/accuracy")
    if forced:
        ax.plot([n for n, _ in forced], [v for _, v in forced], "s--", alpha=0.6,
                label="scored (argmax of one forward)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context length (tokens)", ylabel="accuracy", ylim=(0, 1.08),
           title=f"passkey accuracy by length (step {generated['step']})")
    ticks = sorted({n for n, _ in gen + forced})
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.legend(fontsize=8)
