"""Diagrams for docs/: which (query, key) pairs each ring step computes, per layout.

    python tools/layout_diagram.py docs/figures     # layout_steps.png

Pure NumPy and Matplotlib (no JAX): the picture is computed from
`lca.layouts.positions`, the same positions the ring kernel's masks use.
At ring step s, rank r holds the key/value shard of rank (r - s) mod n, so the
block of layout-order rows of shard r and columns of shard (r - s) mod n is
computed at step s.
"""

from __future__ import annotations

import os

import numpy as np

from lca import layouts


def step_of_pairs(seq_len: int, layout: str, num_shards: int) -> np.ndarray:
    """int [T, T] in layout order: the ring step computing (query, key), -1 if causally masked."""
    pos = layouts.positions(seq_len, layout, num_shards)
    shard = np.arange(seq_len) // (seq_len // num_shards)
    step = (shard[:, None] - shard[None, :]) % num_shards
    return np.where(pos[:, None] >= pos[None, :], step, -1)


def work_per_step(seq_len: int, layout: str, num_shards: int) -> np.ndarray:
    """float [steps, ranks]: the fraction of a shard pair's (query, key) pairs that are visible."""
    steps = step_of_pairs(seq_len, layout, num_shards)
    shard_len = seq_len // num_shards
    work = np.zeros((num_shards, num_shards))
    for r in range(num_shards):
        rows = steps[r * shard_len:(r + 1) * shard_len]
        for s in range(num_shards):
            work[s, r] = (rows == s).sum() / shard_len ** 2
    return work


def write_layout_steps(out_dir: str, seq_len: int = 32, num_shards: int = 4) -> str:
    """PNG: per layout, the causal (query, key) pairs coloured by ring step, and the work
    of every (step, rank) with its critical path (the sum over steps of the busiest rank)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    names = layouts.LAYOUTS
    fig, axes = plt.subplots(2, len(names), figsize=(4.0 * len(names), 7.6),
                             gridspec_kw={"height_ratios": [1.4, 1]}, layout="constrained")
    colours = ListedColormap(["white"] + [plt.cm.viridis(x) for x in
                                          np.linspace(0.0, 0.95, num_shards)])
    shard_len = seq_len // num_shards
    for col, name in enumerate(names):
        steps = step_of_pairs(seq_len, name, num_shards)
        ax = axes[0, col]
        image = ax.imshow(steps + 1, cmap=colours, vmin=-0.5, vmax=num_shards + 0.5,
                          interpolation="none")
        for edge in range(1, num_shards):
            ax.axhline(edge * shard_len - 0.5, color="black", lw=0.8)
            ax.axvline(edge * shard_len - 0.5, color="black", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("key slot, layout order")
        ax.set_ylabel("query slot, layout order")
        ax.set_xticks([]), ax.set_yticks([])

        work = work_per_step(seq_len, name, num_shards)
        ax = axes[1, col]
        ax.imshow(work, cmap="Greys", vmin=0, vmax=1, aspect="auto")
        for s in range(num_shards):
            for r in range(num_shards):
                ax.text(r, s, f"{work[s, r]:.2f}", ha="center", va="center",
                        color="white" if work[s, r] > 0.5 else "black", fontsize=8)
        critical = work.max(1).sum()
        ax.set_title(f"critical path {critical:.2f} (ideal {work.sum() / num_shards:.2f})",
                     fontsize=10)
        ax.set_xlabel("rank"), ax.set_ylabel("ring step")
        ax.set_xticks(range(num_shards)), ax.set_yticks(range(num_shards))
    bar = fig.colorbar(image, ax=axes[0, :].tolist(), ticks=np.arange(num_shards + 1),
                       shrink=0.8)
    bar.ax.set_yticklabels(["masked"] + [f"step {s}" for s in range(num_shards)])
    fig.suptitle(f"Causal ring attention, T={seq_len} on n={num_shards} shards. Top: visible"
                 " pairs by the ring step that computes them (lines split shards).\nBottom: work"
                 " of each (step, rank), the visible fraction of its shard pair.", fontsize=10)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "layout_steps.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    import sys

    print(f"wrote {write_layout_steps(sys.argv[1] if len(sys.argv) > 1 else 'docs/figures')}")
