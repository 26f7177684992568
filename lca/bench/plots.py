"""Figures of the benchmark suite: time and compiled memory against length, log-log.

One PNG per part (`bench_<part>.png`): rows are forward and forward+backward,
columns are median time (error bars: the min-max spread of the repeats) and
temporary memory per device. A point over the memory budget has no time; its
compiled memory is drawn hollow. The mesh part adds `bench_mesh_sizes.png`:
time against the number of devices at one length. The decode part has its
own, `plot_decode` (`bench_decode.png`).
"""

from __future__ import annotations

import collections
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from lca.bench.records import label as impl_label  # noqa: E402
from lca.bench.suite import MODES  # noqa: E402


def _length(x, _):
    return f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"


def _label(p):
    layout = "" if p.layout == "-" else f" {p.layout}"
    n = f" n={p.n}" if p.n > 1 else ""
    return f"{impl_label(p)}{layout}{n} h{p.heads}/{p.kv_heads}"


def _color(p, names):
    """One colour per kernel and layout, in every panel: names is the sorted list of them."""
    return f"C{names.index((impl_label(p), p.layout)) % 10}"


def _series(points):
    """{label: points sorted by length}, for series with a point at two lengths or more."""
    series = collections.defaultdict(list)
    for p in points:
        series[_label(p)].append(p)
    return {k: sorted(v, key=lambda p: p.seq_len) for k, v in series.items()
            if len({p.seq_len for p in v}) > 1}


def plot_part(points, part, path):
    rows = [p for p in points if p.part == part]
    if not rows:
        return None
    names = sorted({(impl_label(p), p.layout) for p in rows})
    fig, axes = plt.subplots(len(MODES), 2, figsize=(13, 4.5 * len(MODES)), squeeze=False)
    for i, mode in enumerate(MODES):
        series = _series([p for p in rows if p.mode == mode])
        for label, ps in sorted(series.items()):
            style = dict(color=_color(ps[0], names),
                         linestyle="-" if ps[0].heads == ps[0].kv_heads else "--")
            ran = [p for p in ps if p.seconds is not None]
            if ran:
                axes[i, 0].errorbar([p.seq_len for p in ran], [p.seconds for p in ran],
                                    yerr=[[p.seconds - p.seconds_min for p in ran],
                                          [p.seconds_max - p.seconds for p in ran]],
                                    marker="o", label=label, capsize=2, **style)
            axes[i, 1].plot([p.seq_len for p in ps], [p.temp_bytes / 2**20 for p in ps],
                            marker="o", label=label, **style)
            over = [p for p in ps if not p.fits]
            axes[i, 1].plot([p.seq_len for p in over], [p.temp_bytes / 2**20 for p in over],
                            "o", markerfacecolor="white", markersize=10, color=style["color"])
        for j, what in enumerate(("median seconds", "temporary MiB per device")):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_length))
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(what)
            ax.set_title(f"{part}: {mode}, {what}")
            ax.grid(True, which="both", alpha=0.3)
        if axes[i, 0].get_legend_handles_labels()[0]:
            axes[i, 0].legend(fontsize=7)
    fig.suptitle("hollow: over the memory budget, not run; dashed: grouped-query heads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mesh_sizes(points, path):
    rows = [p for p in points if p.part == "mesh" and p.seconds is not None]
    lengths = collections.Counter(p.seq_len for p in rows if p.n != max(p.n for p in rows))
    if not lengths:
        return None
    seq_len = lengths.most_common(1)[0][0]
    names = sorted({(impl_label(p), p.layout) for p in rows})
    fig, axes = plt.subplots(1, len(MODES), figsize=(13, 4.5), squeeze=False)
    for i, mode in enumerate(MODES):
        series = collections.defaultdict(list)
        for p in rows:
            if p.mode == mode and p.seq_len == seq_len:
                series[impl_label(p), p.layout, p.heads, p.kv_heads].append(p)
        for (impl, layout, h, kv), ps in sorted(series.items()):
            ps = sorted(ps, key=lambda p: p.n)
            if len(ps) > 1:
                axes[0, i].plot([p.n for p in ps], [p.seconds for p in ps], marker="o",
                                label=f"{impl} {layout} h{h}/{kv}", color=_color(ps[0], names))
        ax = axes[0, i]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("devices on the sequence axis n (emulated, sharing the CPU cores)")
        ax.set_ylabel("median seconds")
        ax.set_title(f"mesh: {mode}, T={seq_len}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(points, out_dir):
    """Every suite figure for `points` into out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [plot_part(points, part, os.path.join(out_dir, f"bench_{part}.png"))
             for part in sorted({p.part for p in points})]
    paths.append(plot_mesh_sizes(points, os.path.join(out_dir, "bench_mesh_sizes.png")))
    return [p for p in paths if p]


DECODE_LINES = (("cache", "cache, one device"), ("recompute", "recompute (no cache), one device"),
                ("cache_sharded", "cache sharded in place, n={n}"),
                ("cache_gathered", "cache all-gathered each step, n={n}"))


def plot_decode(points, path):
    """The decode part (`lca.bench.decode`): per-token time and bytes per step against the
    cache length, and prefill time per strategy; log-log."""
    rows = [p for p in points if p.part == "decode" and p.seconds is not None]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for i, (impl, text) in enumerate(DECODE_LINES):
        ps = sorted((p for p in rows if p.impl == impl and p.mode == "decode"),
                    key=lambda p: p.seq_len)
        if not ps:
            continue
        label = text.format(n=ps[0].n)
        axes[0].errorbar([p.seq_len for p in ps], [p.seconds for p in ps],
                         yerr=[[p.seconds - p.seconds_min for p in ps],
                               [p.seconds_max - p.seconds for p in ps]],
                         marker="o", capsize=2, color=f"C{i}", label=label)
        if ps[0].n > 1:
            axes[1].plot([p.seq_len for p in ps], [p.sent_bytes for p in ps], marker="o",
                         color=f"C{i}", label=label)
        if impl == "cache":  # a guide of slope 1 through the longest point: linear in L
            last = ps[-1]
            axes[0].plot([ps[0].seq_len, last.seq_len],
                         [last.seconds * ps[0].seq_len / last.seq_len, last.seconds], ":",
                         color="gray", label="proportional to L")
    prefill = [p for p in rows if p.mode == "prefill"]
    for i, impl in enumerate(sorted({p.impl for p in prefill})):
        ps = sorted((p for p in prefill if p.impl == impl), key=lambda p: p.seq_len)
        axes[2].errorbar([p.seq_len for p in ps], [p.seconds for p in ps],
                         yerr=[[p.seconds - p.seconds_min for p in ps],
                               [p.seconds_max - p.seconds for p in ps]],
                         marker="o", capsize=2, color=f"C{i + 4}", label=f"{impl}, n={ps[0].n}")
    titles = ("per-token decode time (batch 1)", "bytes one device sends per decode step",
              "prefill of L tokens, per strategy")
    for ax, title, what in zip(axes, titles, ("median seconds per token", "bytes", "median s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_length))
        ax.set_xlabel("cache length L" if ax is not axes[2] else "prompt length L")
        ax.set_ylabel(what)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("python experiments/bench.py --part decode (emulated CPU devices share the"
                 " machine's cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sparse(points, path):
    """The sparse part (`lca.bench.sparse`): speed-up over dense attention against the
    length per variant, and HyperAttention's error against its speed-up."""
    rows = [p for p in points if p.part == "sparse" and p.vs_baseline is not None]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    series = collections.defaultdict(list)
    for p in rows:
        if p.impl != "blockwise":
            gqa = "" if p.heads == p.kv_heads else f" h{p.heads}/{p.kv_heads}"
            series[f"{p.impl} {p.mode} block {p.block}{gqa}"].append(p)
    for i, (label, ps) in enumerate(sorted(series.items())):
        ps.sort(key=lambda p: p.seq_len)
        axes[0].plot([p.seq_len for p in ps], [p.vs_baseline for p in ps], marker="o",
                     color=f"C{i % 10}", linestyle="--" if ps[0].mode == "fwd" else "-",
                     label=label)
    axes[0].axhline(1.0, color="gray", linewidth=0.8)
    axes[0].set_xscale("log", base=2)
    axes[0].set_ylim(bottom=0)
    axes[0].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_length))
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
    axes[0].set_xlabel("sequence length T")
    axes[0].set_ylabel("dense seconds / seconds (same T and mode)")
    axes[0].set_title("speed-up over dense blockwise attention, one device")
    samples = collections.defaultdict(list)
    for p in rows:
        if p.impl.startswith("hyper/"):
            samples[int(p.impl[7:])].append(p)
    for i, (m, ps) in enumerate(sorted(samples.items())):
        ps.sort(key=lambda p: p.seq_len)
        axes[1].plot([p.vs_baseline for p in ps], [p.max_rel_error for p in ps], marker="o",
                     color=f"C{i % 10}", label=f"hyper fwd, sample_size {m}")
        for p in ps:
            axes[1].annotate(_length(p.seq_len, None), (p.vs_baseline, p.max_rel_error),
                             textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes[1].set_xlabel("speed-up over exact forward")
    axes[1].set_ylabel("max |out - exact| / max |exact|")
    axes[1].set_title("HyperAttention: error against speed-up (labels: T)")
    return _finish(fig, axes, "python experiments/bench.py --part sparse (float32, head_dim 64,"
                   " batch 1)", path)


def _finish(fig, axes, title, path):
    """Grids and legends on every axis, the title, saved to `path` and closed; the path."""
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_efficiency(points, path):
    """The efficiency part (`lca.bench.efficiency`): fraction of the matmul peak against
    the length, one line per tile."""
    series = collections.defaultdict(list)
    for p in points:
        if p.part == "efficiency" and p.peak_fraction is not None:
            series[p.block].append(p)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (block, ps) in enumerate(sorted(series.items())):
        ps.sort(key=lambda p: p.seq_len)
        ax.plot([p.seq_len for p in ps], [p.peak_fraction for p in ps], marker="o",
                color=f"C{i % 10}", label=f"{ps[0].impl} tile {block}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_length))
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("useful FLOP/s / matmul peak (same run)")
    ax.set_title("causal forward+backward, one device, 4 heads of 64, float32")
    return _finish(fig, [ax], "python experiments/bench.py --part efficiency", path)
