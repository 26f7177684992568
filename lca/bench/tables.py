"""The README's and docs/' result tables, written from the data files in docs/figures.

    python experiments/figures.py            # measure everything, then rewrite the tables
    python experiments/figures.py --tables   # rewrite the tables from the data already there

A table lives in a Markdown file between two comments,

    <!-- table:single -->
    ...rewritten...
    <!-- /table:single -->

and `TABLES[name](data)` renders it from `load(figures_dir)`: the suite's
bench_suite.csv, the cost-model validation CSVs (`lca.bench.validation`),
bench_train.json (`lca.bench.train_report`) and the cost model's
cost_*.csv. No number in these tables is typed by hand; a table whose data
is missing is left as it was, and the update says so. Every table ends with
a line naming its data file and the run's grid and matmul peak.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re

from lca.bench import figures, records, validation

REPO = figures.REPO
FIGURES_DIR = os.path.join(REPO, "docs", "figures")
SUITE_CSV = "bench_suite.csv"
TRAIN_JSON = "bench_train.json"
MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)",
                    re.S)


# ----------------------------------------------------------------------------- data


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(figures_dir):
    """{what: rows} for every data file present in figures_dir."""
    data = {}
    path = os.path.join(figures_dir, SUITE_CSV)
    if os.path.exists(path):
        data["points"] = records.read_points(path)
        data["suite"] = _rows(path)[0]  # the extra columns: grid, matmul peak
    for key, name in (("balance", validation.BALANCE_CSV), ("memory", validation.MEMORY_CSV),
                      ("overlap", "cost_overlap.csv"), ("step_time", "cost_step_time.csv")):
        path = os.path.join(figures_dir, name)
        if os.path.exists(path):
            data[key] = _rows(path)
    path = os.path.join(figures_dir, TRAIN_JSON)
    if os.path.exists(path):
        with open(path) as f:
            data["train"] = json.load(f)
    return data


def _suite_source(data):
    meta = data["suite"]
    return (f"_From `docs/figures/{SUITE_CSV}` (grid `{meta.get('grid', '?')}`, matmul peak"
            f" {float(meta['matmul_peak_gflops']):.0f} GFLOP/s in that run,"
            f" {meta.get('finished', '?')})._")


def _at(data, **where):
    """The suite's points matching every field in `where`."""
    return [p for p in data.get("points", ())
            if all(getattr(p, k) == v for k, v in where.items())]


def _one(data, **where):
    found = _at(data, **where)
    return found[0] if len(found) == 1 else None


def _tokens(t):
    if t >= 1 << 20 and t % (1 << 20) == 0:
        return f"{t >> 20}M"
    return f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t)


def _mib(b):
    return f"{b / 2**20:,.1f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tables


def single(data):
    """One device, forward+backward: xla, blockwise and linear side by side, per heads and T."""
    rows = []
    for h, kv in sorted({(p.heads, p.kv_heads) for p in _at(data, part="single")}):
        for t in sorted({p.seq_len for p in _at(data, part="single", heads=h)}):
            at = {p.impl: p for p in _at(data, part="single", heads=h, kv_heads=kv, seq_len=t,
                                         mode="fwd+bwd")}
            xla, row = at.get("xla"), [f"{h}/{kv}", _tokens(t)]
            for impl in ("xla", "blockwise", "linear"):
                p = at.get(impl)
                if p is None:
                    row += ["–"] * (2 if impl != "xla" else 1)
                    continue
                time = f"{p.seconds:.3f}" if p.seconds is not None else "over budget"
                row.append(time)
                if impl != "xla":
                    faster = (xla is not None and xla.seconds and p.seconds)
                    row.append(f"{xla.seconds / p.seconds:.1f}x" if faster else "–")
            row += [_mib(at[i].temp_bytes) if i in at else "–"
                    for i in ("xla", "blockwise", "linear")]
            rows.append(row)
    if not rows:
        return None
    worst = max(p.max_rel_error for p in _at(data, part="single"))
    return "\n".join([
        _table(["heads", "T", "xla s", "blockwise s", "vs xla", "linear s", "vs xla",
                "xla MiB", "blockwise MiB", "linear MiB"], rows), "",
        f"Causal forward+backward, batch 1, head_dim 64, float32; median seconds, speed-up"
        f" over `xla` in the same rounds, compiled temporary memory. \"over budget\": the"
        f" compiled program needs more than half the machine's memory and was not run."
        f" Largest error of any kernel here against float64: {worst:.1e}.",
        _suite_source(data)])


def mesh(data):
    """The 8-device mesh at its longest length: every ring layout against ringattention."""
    points = [p for p in _at(data, part="mesh", mode="fwd+bwd")
              if p.seconds is not None and not p.impl.startswith("linear")]
    if not points:
        return None
    n = max(p.n for p in points)
    t = max(p.seq_len for p in points if p.n == n)
    heads = sorted({(p.heads, p.kv_heads) for p in points if p.n == n and p.seq_len == t},
                   key=lambda hk: (hk[0] != hk[1], hk))
    kernels = sorted({(p.impl, p.layout) for p in points if p.n == n and p.seq_len == t},
                     key=lambda k: (k[0] == "ringattention", k[0] != "ring", k))
    rows = []
    for impl, layout in kernels:
        row = [impl, layout]
        for h, kv in heads:
            p = _one(data, part="mesh", impl=impl, layout=layout, n=n, heads=h, kv_heads=kv,
                     seq_len=t, mode="fwd+bwd")
            ra = _one(data, part="mesh", impl="ringattention", n=n, heads=h, kv_heads=kv,
                      seq_len=t, mode="fwd+bwd")
            if p is None or p.seconds is None:
                row += ["–"] * 3
                continue
            ratio = f"{p.seconds / ra.seconds:.2f}" if ra and ra.seconds else "–"
            row += [f"{p.seconds:.2f}", ratio, _mib(p.temp_bytes)]
        rows.append(row)
    header = ["impl", "layout"]
    for h, kv in heads:
        header += [f"{h}/{kv} heads: s", "/ ringattention", "MiB per device"]
    return "\n".join([
        _table(header, rows), "",
        f"Causal forward+backward at T={t:,} on {n} emulated CPU devices, batch 1, head_dim"
        f" 64, float32: median seconds, time relative to the `ringattention` package's (below"
        f" 1 is faster) and compiled temporaries per device.",
        _suite_source(data)])


def linear(data):
    """Linear attention's time per token on one device, to the longest length measured."""
    one = sorted(_at(data, part="linear", n=1), key=lambda p: p.seq_len)
    lens = sorted({p.seq_len for p in one if p.seconds is not None})
    if not lens:
        return None
    per_token = {(p.seq_len, p.mode): 1e6 * p.seconds / p.seq_len for p in one if p.seconds}
    base = lens[0]
    rows = [[f"{t:,}", f"{per_token[t, 'fwd']:.2f}", f"{per_token[t, 'fwd+bwd']:.2f}",
             f"{per_token[t, 'fwd+bwd'] / per_token[base, 'fwd+bwd']:.2f}"] for t in lens]
    lines = [_table(["T", "fwd µs/token", "fwd+bwd µs/token", f"vs {_tokens(base)}"], rows), ""]
    par = [p for p in _at(data, part="linear") if p.n > 1 and p.seconds is not None]
    if par:
        t, n = par[0].seq_len, par[0].n
        by = {(p.impl, p.mode): p.seconds for p in par}
        cells = [f"{impl.split('/')[1]} {by[impl, 'fwd']:.2f} s / {by[impl, 'fwd+bwd']:.2f} s"
                 for impl in sorted({p.impl for p in par})]
        lines.append(f"Across {n} emulated devices at T={t:,} (forward / forward+backward),"
                     f" by how the states cross shards: " + "; ".join(cells) + ".")
    lines.append("One device, batch 1, 4 heads, key and value dims 64, float32, per-head decay,"
                 " chunk 64.")
    lines.append(_suite_source(data))
    return "\n".join(lines)


def balance(data):
    """Ring load balance: measured critical paths against the cost model's prediction."""
    rows = data.get("balance")
    if not rows:
        return None
    r0 = rows[0]
    body = [[r["layout"], r["block"], f"{float(r['critical_path_s']):.2f}",
             f"{float(r['measured_vs_contiguous']):.3f}",
             f"{float(r['predicted_vs_contiguous']):.3f} ({float(r['predicted_tiles']):.0f})",
             f"{100 * _difference(r):+.1f}%"] for r in rows]
    return "\n".join([
        _table(["layout", "tile", "critical path (s)", "measured vs contiguous",
                "predicted vs contiguous (tiles)", "predicted / measured - 1"], body), "",
        f"Causal, T={int(r0['seq_len']):,}, n={r0['num_shards']}, heads 2/2, head_dim 64:"
        f" every (step, rank) ring step's forward+backward kernels timed on one device"
        f" (fastest of the repeats); critical path = sum over steps of the slowest rank."
        f" Predicted: `tools/cost_model.py` from FLOPs alone.",
        f"_From `docs/figures/{validation.BALANCE_CSV}` (`lca/bench/validation.py`)._"])


def _difference(row):
    """predicted / measured - 1, from a cost_validation_balance.csv row."""
    return float(row["predicted_vs_contiguous"]) / float(row["measured_vs_contiguous"]) - 1


def memory_check(data):
    rows = data.get("memory")
    if not rows:
        return None
    body = [[f"{int(r['seq_len']):,}", _mib(int(r["compiled_bytes"])), _mib(int(r["model_bytes"])),
             f"{int(r['model_bytes']) / int(r['compiled_bytes']):.2f}"] for r in rows]
    return "\n".join([
        _table(["T", "compiled MiB per device", "model MiB", "model / compiled"], body), "",
        f"_From `docs/figures/{validation.MEMORY_CSV}` (`lca/bench/validation.py`)._"])


def overlap(data):
    rows = data.get("overlap")
    if not rows:
        return None
    by = {(r["hardware"], r["pass"]): int(r["smallest_shard_len"]) for r in rows}
    names = list(dict.fromkeys(r["hardware"] for r in rows))
    body = [[name, by.get((name, "forward"), "–"), by.get((name, "backward"), "–")]
            for name in names]
    return "\n".join([
        _table(["profile", "forward", "backward (K/V hop; dK/dV is never hidden)"], body), "",
        "_From `docs/figures/cost_overlap.csv` (`tools/cost_model.py`)._"])


def step_time(data):
    """The cost model's step time at the longest length plotted, per hardware and kernel."""
    rows = data.get("step_time")
    if not rows:
        return None
    t = max(int(r["seq_len"]) for r in rows)
    at = [r for r in rows if int(r["seq_len"]) == t]
    body = [[r["hardware"], r["kernel"], r["layout"], f"{float(r['seconds']):.2f}",
             f"{float(r['balance']):.2f}",
             "yes" if r["hidden_fwd"] == "True" else "no",
             f"{int(r['temp_bytes']) / 1e9:.1f}"] for r in at]
    return "\n".join([
        _table(["profile", "kernel", "layout", f"step s at {_tokens(t)}", "balance",
                "forward hops hidden", "temporaries GB"], body), "",
        "_From `docs/figures/cost_step_time.csv` (`tools/cost_model.py`)._"])


def train(data):
    report = data.get("train")
    if not report:
        return None
    memory, speed = report.get("memory", {}), report.get("speed", {})
    dense = memory.get("xla", {}).get("longest")
    rows = []
    for kernel in dict.fromkeys(list(speed) + list(memory)):
        if kernel == "ratio":
            continue
        s, m = speed.get(kernel, {}), memory.get(kernel, {})
        rows.append([kernel,
                     f"{s['tokens_per_s']:,.0f}" if s else "–",
                     f"{m['longest']:,}" if m else "–",
                     f"{m['bytes'] / 2**30:.2f}" if m and m.get("bytes") else "–",
                     f"{m['longest'] / dense:.0f}x" if m and dense else "–"])
    mesh = ", ".join(f"{k}={v}" for k, v in report["speed_mesh"].items())
    return "\n".join([
        _table(["kernel", f"tokens/s at T={report['seq_len']:,}", "longest context (tokens)",
                "GiB per device there", "vs xla"], rows), "",
        f"Default model (`{report['config']}`). Speed: training steps on the ({mesh}) mesh,"
        f" median of the timed steps. Longest context: one training step within"
        f" {report.get('budget_gib', 20):g} GiB per device on the config's own mesh, from"
        f" compiled memory analysis (nothing run).",
        f"_From `docs/figures/{TRAIN_JSON}` (`lca/bench/train_report.py`)._"])


def questions(data):
    """The README's five questions, each answered from the data."""
    if not {"points", "balance", "train"} <= set(data):
        return None
    blk = lambda **w: _one(data, part="single", impl="blockwise", mode="fwd+bwd", **w)
    xla = lambda **w: _one(data, part="single", impl="xla", mode="fwd+bwd", **w)
    h, kv = 4, 4
    lens = sorted({p.seq_len for p in _at(data, part="single", impl="xla", heads=h)})
    ran = [t for t in lens if xla(heads=h, kv_heads=kv, seq_len=t).seconds]
    speedup = lambda t: (xla(heads=h, kv_heads=kv, seq_len=t).seconds
                         / blk(heads=h, kv_heads=kv, seq_len=t).seconds)
    faster = ", ".join(f"{speedup(t):.1f}x at {_tokens(t)}" for t in ran if t >= 2048)
    gqa = [(t, xla(heads=8, kv_heads=2, seq_len=t), blk(heads=8, kv_heads=2, seq_len=t))
           for t in ran[-1:]]
    faster += "".join(f" (8/2 heads: {x.seconds / b.seconds:.1f}x at {_tokens(t)})"
                      for t, x, b in gqa if x and b and x.seconds)
    t_fit = ran[-1]
    x, b = xla(heads=h, kv_heads=kv, seq_len=t_fit), blk(heads=h, kv_heads=kv, seq_len=t_fit)
    memory = f"{x.temp_bytes / b.temp_bytes:.0f}x less temporary memory at {_tokens(t_fit)}"
    over = [t for t in lens if not xla(heads=h, kv_heads=kv, seq_len=t).fits]
    if over:
        x, b = xla(heads=h, kv_heads=kv, seq_len=over[0]), blk(heads=h, kv_heads=kv,
                                                               seq_len=over[0])
        memory += (f"; at {_tokens(over[0])} dense needs {x.temp_bytes / 2**30:.1f} GiB and is not"
                   f" run, `blockwise` {b.temp_bytes / 2**20:.0f} MiB"
                   f" ({x.temp_bytes / b.temp_bytes:.0f}x less)")
    mem = data["train"].get("memory", {})
    dense = mem.get("xla", {}).get("longest")
    context = ", ".join(f"`{k}` {_tokens_long(m['longest'])}"
                        + (f" ({m['longest'] / dense:.0f}x)" if dense and k != "xla" else "")
                        for k, m in mem.items())
    bal = {r["layout"]: r for r in data["balance"]}
    layout = (f"`zigzag`: ring critical path {float(bal['zigzag']['measured_vs_contiguous']):.2f}x"
              f" contiguous's (cost model {float(bal['zigzag']['predicted_vs_contiguous']):.2f});"
              f" `striped` {float(bal['striped']['measured_vs_contiguous']):.2f}x"
              f" ({float(bal['striped']['predicted_vs_contiguous']):.2f})")
    ratios = [(t, _one(data, part="single", impl="linear", heads=h, kv_heads=kv, seq_len=t,
                       mode="fwd+bwd"), blk(heads=h, kv_heads=kv, seq_len=t)) for t in lens]
    ratios = [(t, lin.seconds / b.seconds) for t, lin, b in ratios if lin and b and lin.seconds]
    wins = [t for t, r in ratios if r < 1]
    lin = sorted((p for p in _at(data, part="linear", n=1, mode="fwd+bwd") if p.seconds),
                 key=lambda p: p.seq_len)
    linear = (f"faster than `blockwise` forward+backward from {_tokens(min(wins))} tokens"
              f" ({dict(ratios)[min(wins)]:.2f}x the time; {ratios[-1][1]:.2f}x at"
              f" {_tokens(ratios[-1][0])})" if wins else "`blockwise` was faster at every length")
    if lin:
        linear += (f"; {1e6 * lin[0].seconds / lin[0].seq_len:.1f} µs/token at"
                   f" {_tokens(lin[0].seq_len)}, {1e6 * lin[-1].seconds / lin[-1].seq_len:.1f}"
                   f" at {_tokens(lin[-1].seq_len)}")
    rows = [
        ["How much faster than dense attention?",
         f"`blockwise` forward+backward against `jax.nn.dot_product_attention`: {faster}",
         "[one device](#one-device)"],
        ["How much less memory?", memory, "[one device](#one-device)"],
        ["How far past dense does the context go?",
         f"one training step in {data['train'].get('budget_gib', 20):g} GiB per device: {context}"
         if context else "not measured in this run (`--quick` skips the search)",
         "[training](#training-step)"],
        ["Which layout for causal training?", layout, "[ring](#ring-attention)"],
        ["When does linear attention win?", linear, "[linear](#linear-attention)"],
    ]
    return _table(["question", "answer on this machine", "table"], rows)


def _tokens_long(t):
    return f"{t / 1e6:.2f}M tokens" if t >= 10**6 else f"{t:,} tokens"


TABLES = {"questions": questions, "single": single, "mesh": mesh, "linear": linear,
          "balance": balance, "memory-check": memory_check, "overlap": overlap,
          "step-time": step_time, "train": train}


# ----------------------------------------------------------------------------- files


def update_text(text, tables, where="text"):
    """(new text, names rewritten, names kept because their data is missing)."""
    written, kept = [], []

    def replace(m):
        name = m["name"]
        if name not in tables:
            raise KeyError(f"{where}: unknown table {name!r}; tables: {sorted(tables)}")
        body = tables[name]
        if body is None:
            kept.append(name)
            return m[0]
        written.append(name)
        return m[1] + body.rstrip("\n") + "\n" + m[4]

    return MARKER.sub(replace, text), written, kept


def markdown_files(root=REPO):
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def render(figures_dir):
    data = load(figures_dir)
    return {name: fn(data) for name, fn in TABLES.items()}


def update_docs(figures_dir, files=None):
    """Rewrites every marked table in README.md and docs/*.md; returns one line per file."""
    tables = render(figures_dir)
    notes = []
    for path in files or markdown_files():
        with open(path) as f:
            text = f.read()
        new, written, kept = update_text(text, tables, where=path)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
        if written or kept:
            notes.append(f"{os.path.relpath(path, REPO)}: rewrote {', '.join(written) or 'none'}"
                         + (f"; kept (no data): {', '.join(kept)}" if kept else ""))
    return notes
