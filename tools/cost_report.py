"""What the cost model (tools/cost_model.py) prints and draws: a breakdown, two figures.

  python tools/cost_model.py --kernel ring --layout zigzag --seq_len 1048576 --devices 256
  python tools/cost_report.py --plots docs/figures   # cost_{step_time,overlap,strategy}.png/.csv

`python experiments/figures.py` runs `write_plots` into docs/figures.
"""

import argparse
import os

import numpy as np

from cost_model import (HARDWARE, KERNELS, LAYOUTS, LINEAR_ALGORITHMS, Prediction, Problem,
                        predict, wire_bytes)

from lca.kernels import registry

# ----------------------------------------------------------------------------- report


def _si(x, unit):
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _seconds(x):
    for scale, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "us")):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x * 1e9:.3g} ns"


_HIDDEN = {True: "hidden under compute", False: "NOT fully hidden",
           None: "(local compute not modelled for linear attention)"}


def format_prediction(r: Prediction) -> str:
    p, hw = r.problem, HARDWARE[r.hardware]
    bw, lat = hw.ring_link(p.devices)
    bq, bk = p.blocks()
    lines = [f"{p.kernel} / {p.layout}: T={p.seq_len} on {p.devices} x {hw.name}"
             f" (L={p.shard_len}, heads {p.heads}/{p.kv_heads}, head_dim {p.head_dim},"
             f" {8 * p.itemsize}-bit inputs, tiles {bq}x{bk}, causal={p.causal})",
             f"  peak {_si(hw.peak_flops, 'FLOP/s')} x efficiency {r.efficiency};"
             f" ring link {_si(bw, 'B/s')} each way, {_seconds(lat)} per hop"]
    for i, name in enumerate(("forward", "backward")):
        flops = r.flops[i]
        if not flops.any() and not r.bytes_sent[i]:
            continue
        lines.append(f"  {name}: {_si(flops.sum() / flops.shape[1], 'FLOP')} per device on"
                     f" average, slowest rank per step {_si(flops.max(1).max(), 'FLOP')};"
                     f" sends {_si(r.bytes_sent[i], 'B')} per device")
        lines.append(f"    compute {_seconds(r.compute_seconds[i])}, communication"
                     f" {_seconds(r.comm_seconds[i])},"
                     f" step total {_seconds(r.step_seconds[i].sum())};"
                     f" communication {_HIDDEN[r.hidden[i]]}")
    if any(r.a2a_seconds):
        lines.append(f"  all-to-all over {p.a2a_degree} devices (not overlapped): forward"
                     f" {_seconds(r.a2a_seconds[0])}, backward {_seconds(r.a2a_seconds[1])}")
    lines.append(f"  critical path / ideal (load balance): {r.balance:.3f}")
    lines.append(f"  predicted time: {_seconds(r.seconds)}")
    mem = r.memory
    lines.append("  memory per device: " + ", ".join(f"{k} {_si(v, 'B')}" for k, v in mem.items())
                 + f"; HBM {_si(hw.hbm_bytes, 'B')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

PLOT_HEADS = dict(heads=32, kv_heads=8, head_dim=128, itemsize=2)
PLOT_LENGTHS = [1 << k for k in range(15, 23)]  # 32k .. 4M tokens


def overlap_threshold(hardware, efficiency=0.5, devices=256, layout="zigzag", pass_="forward",
                      grid=256, limit=1 << 17):
    """Smallest shard length (a multiple of `grid`) from which every ring hop hides.

    Bisection over multiples of `grid`, assuming overlap is monotone in the
    shard length (compute grows as L^2, a hop as L).
    """
    def hidden(length):
        p = Problem(registry.DEFAULT_STRATEGY, layout, length * devices, devices=devices,
                    **PLOT_HEADS)
        r = predict(p, hardware, efficiency)
        f, b = r.flops
        rate = HARDWARE[hardware].peak_flops * efficiency
        bw, lat = HARDWARE[hardware].ring_link(devices)
        size = wire_bytes(p)[0]["K/V"][0] + wire_bytes(p)[0]["ids"][0]
        comm = lat + size / bw
        work = (f if pass_ == "forward" else b).max(1)[:-1] / rate
        return bool((work >= comm).all())

    lo, hi = 1, limit // grid
    if not hidden(hi * grid):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hidden(mid * grid) else (mid + 1, hi)
    return lo * grid


def _write_csv(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(str(x) for x in row) + "\n")


def write_plots(out_dir, efficiency=0.5, devices=256, lengths=PLOT_LENGTHS):
    """Writes cost_step_time, cost_overlap and cost_strategy (.png, .csv) into `out_dir`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    rows = []
    series = [(s.name, x) for s in registry.entries("strategy")
              if s.communication in ("ring", "allgather") for x in s.bench_layouts]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, hw in zip(axes, ("tpu_v5p", "h100")):
        for kernel, layout in series:
            times, too_big = [], []
            for t in lengths:
                r = predict(Problem(kernel, layout, t, devices=devices, **PLOT_HEADS), hw,
                            efficiency)
                times.append(r.seconds)
                if sum(r.memory.values()) > HARDWARE[hw].hbm_bytes:
                    too_big.append((t, r.seconds))
                rows.append((hw, kernel, layout, t, devices, r.seconds, *r.compute_seconds,
                             *r.comm_seconds, *r.bytes_sent, r.balance, *r.hidden,
                             r.memory["temporaries"]))
            line, = ax.loglog(lengths, times, marker="o", ms=3, label=f"{kernel} {layout}")
            if too_big:  # one attention layer alone would not fit in HBM
                ax.plot(*zip(*too_big), "x", ms=10, mew=2, color=line.get_color())
        ideal = [4 * 0.5 * 3.5 * t * t * PLOT_HEADS["heads"] * PLOT_HEADS["head_dim"]
                 / devices / (HARDWARE[hw].peak_flops * efficiency) for t in lengths]
        ax.loglog(lengths, ideal, "k:", label="causal FLOPs / n (ideal)")
        ax.plot([], [], "kx", ms=8, label="exceeds HBM (one layer)")
        ax.set_title(f"{HARDWARE[hw].name} x {devices}")
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("predicted attention fwd+bwd per layer (s)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"predicted step time, heads 32/8, head_dim 128, bf16, efficiency {efficiency}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cost_step_time.png"), dpi=120)
    plt.close(fig)

    _write_csv(os.path.join(out_dir, "cost_step_time.csv"),
               ("hardware", "kernel", "layout", "seq_len", "devices", "seconds", "compute_fwd_s",
                "compute_bwd_s", "comm_fwd_s", "comm_bwd_s", "bytes_fwd", "bytes_bwd", "balance",
                "hidden_fwd", "hidden_bwd", "temp_bytes"), rows)

    names, rows = list(HARDWARE), []
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, pass_ in enumerate(("forward", "backward")):
        values = [overlap_threshold(h, efficiency, devices, pass_=pass_) or 0 for h in names]
        rows += [(h, pass_, devices, v) for h, v in zip(names, values)]
        bars = ax.bar(np.arange(len(names)) + (i - 0.5) * width, values, width, label=pass_)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(np.arange(len(names)), [HARDWARE[h].name for h in names], fontsize=8)
    ax.set_ylabel("smallest shard length L (tokens)")
    ax.set_title(f"smallest shard length from which every K/V hop hides under its step\n"
                 f"(ring, zigzag, {devices} chips, heads 32/8, head_dim 128, bf16,"
                 f" efficiency {efficiency})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cost_overlap.png"), dpi=120)
    plt.close(fig)

    _write_csv(os.path.join(out_dir, "cost_overlap.csv"),
               ("hardware", "pass", "devices", "smallest_shard_len"), rows)

    rows = strategy_rows(efficiency, lengths)
    _strategy_plot(plt, out_dir, rows, list(lengths), efficiency)
    _write_csv(os.path.join(out_dir, "cost_strategy.csv"), STRATEGY_HEADER, rows)


STRATEGY_PANELS = (("tpu_v5p", 256), ("h100", 256), ("tpu_v5p", 16))
A2A_DEGREES = (2, 4, 8, 16, 32)


def strategy_options(devices, heads=PLOT_HEADS["heads"]):
    """(label, kernel, a2a) for every way to split `devices` over the sequence: the ring, the
    all-gather, USP at every all-to-all degree below the devices that divides the heads, and
    Ulysses where the heads split over all of them."""
    out = []
    for s in registry.entries("strategy"):  # each by how it communicates
        if s.communication in ("ring", "allgather"):
            out.append((s.name, s.name, 1))
        elif s.communication == "alltoall+ring":
            out += [(f"{s.name} a2a={a}", s.name, a) for a in A2A_DEGREES
                    if a < devices and heads % a == 0]
    out += [(f"{s.name} (a2a={devices})", s.name, 1) for s in registry.entries("strategy")
            if s.communication == "alltoall" and heads % devices == 0]
    return out


def strategy_rows(efficiency=0.5, lengths=PLOT_LENGTHS, panels=STRATEGY_PANELS):
    """CSV rows of the "which strategy is fastest" figure: every option at every length."""
    rows = []
    for hw, devices in panels:
        for t in lengths:
            found = []
            for label, kernel, a in strategy_options(devices):
                r = predict(Problem(kernel, "zigzag", t, devices=devices, a2a=a, **PLOT_HEADS),
                            hw, efficiency)
                fits = sum(r.memory.values()) <= HARDWARE[hw].hbm_bytes
                found.append([hw, devices, label, kernel, a, t, r.seconds, sum(r.compute_seconds),
                              sum(r.comm_seconds), sum(r.a2a_seconds), sum(r.bytes_sent), fits])
            best = min(row[6] for row in found if row[-1])
            rows += [row + [row[-1] and row[6] == best] for row in found]
    return rows


STRATEGY_HEADER = ("hardware", "devices", "option", "kernel", "a2a", "seq_len", "seconds",
                   "compute_s", "comm_s", "a2a_s", "bytes_sent", "fits", "fastest")


def _strategy_plot(plt, out_dir, rows, lengths, efficiency):
    panels = list(dict.fromkeys((r[0], r[1]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 4.0))
    fig.subplots_adjust(wspace=0.42, left=0.07, right=0.93, top=0.84, bottom=0.14)
    for ax, (hw, devices) in zip(np.atleast_1d(axes), panels):
        mine = [r for r in rows if (r[0], r[1]) == (hw, devices)]
        labels = list(dict.fromkeys(r[2] for r in mine))
        grid = np.full((len(labels), len(lengths)), np.nan)
        for r in mine:
            if r[11]:
                grid[labels.index(r[2]), lengths.index(r[5])] = r[6]
        grid = grid / np.nanmin(grid, axis=0)
        image = ax.imshow(np.log2(grid), cmap="viridis_r", vmin=0, vmax=2, aspect="auto")
        for i in range(len(labels)):
            for j in range(len(lengths)):
                text = "x" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}"
                best = grid[i, j] == 1.0
                ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                        fontweight="bold" if best else "normal",
                        color="white" if not np.isnan(grid[i, j]) and grid[i, j] > 2 else "black")
        ax.set_xticks(range(len(lengths)), [_tokens_axis(t) for t in lengths], fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("sequence length (tokens)", fontsize=8)
        ax.set_title(f"{HARDWARE[hw].name} x {devices}", fontsize=9)
    fig.colorbar(image, ax=axes, label="log2(time / fastest)", fraction=0.015, pad=0.02)
    fig.suptitle(f"which strategy is fastest: predicted attention fwd+bwd time / the fastest"
                 f" option's (1.00, bold; x: exceeds HBM)\nheads 32/8, head_dim 128, bf16,"
                 f" zigzag, efficiency {efficiency} (tools/cost_report.py)", fontsize=9)
    fig.savefig(os.path.join(out_dir, "cost_strategy.png"), dpi=120)
    plt.close(fig)


def _tokens_axis(t):
    return f"{t >> 20}M" if t >= 1 << 20 else f"{t >> 10}k"


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", default=registry.DEFAULT_STRATEGY, choices=KERNELS)
    parser.add_argument("--layout", default="zigzag", choices=LAYOUTS)
    parser.add_argument("--seq_len", type=int, default=1 << 20)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--devices", type=int, default=256)
    parser.add_argument("--a2a", type=int, default=1, help="usp: devices on the all-to-all axis")
    parser.add_argument("--batch", type=int, default=1, help="per device")
    parser.add_argument("--itemsize", type=int, default=2, help="bytes per input element")
    parser.add_argument("--hardware", default="tpu_v5p", choices=list(HARDWARE))
    parser.add_argument("--efficiency", type=float, default=0.5,
                        help="fraction of peak FLOP/s the tiles reach")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--block", type=int, default=None, help="tile length (default per layout)")
    parser.add_argument("--linear_algorithm", default=LINEAR_ALGORITHMS[0],
                        choices=LINEAR_ALGORITHMS)
    parser.add_argument("--forward_only", action="store_true")
    parser.add_argument("--plots", metavar="DIR", help="write the figures and CSV into DIR")
    args = parser.parse_args(argv)
    if args.plots:
        write_plots(args.plots, args.efficiency)
        print(f"wrote cost_step_time, cost_overlap and cost_strategy (.png, .csv) to {args.plots}")
        return
    p = Problem(args.kernel, args.layout, args.seq_len, args.heads, args.kv_heads, args.head_dim,
                args.devices, args.batch, args.itemsize, window=args.window,
                block_q=args.block, block_k=args.block, linear_algorithm=args.linear_algorithm,
                a2a=args.a2a)
    print(format_prediction(predict(p, args.hardware, args.efficiency, not args.forward_only)))


if __name__ == "__main__":
    main()
