"""The result tables as Markdown, each rendered from the data files in docs/figures.

`load(figures_dir)` reads the benchmarks' Points (bench_suite.csv,
bench_balance.csv, bench_train.csv; `lca.bench`) and the cost model's
cost_*.csv; every renderer takes that and returns a table with its caption
and source line, or None when its data is missing. Predictions set beside
measurements (balance, memory) come from `tools/cost_model.py` at render
time. Kernels are named by their role in `lca.kernels.registry` (the
baseline, the default local kernel and strategy, the linear family), so a
kernel registered there appears in the tables without an edit here.
`tools/tables.py` puts them into README.md and docs/.
"""

from __future__ import annotations

import csv
import os

import cost_model as cm

from lca.bench import records
from lca.bench.kernels import A2A, PEER
from lca.kernels import registry

DATA = {"points": "bench_suite.csv", "balance": "bench_balance.csv", "train": "bench_train.csv"}
COST = {"overlap": "cost_overlap.csv", "step_time": "cost_step_time.csv",
        "strategy": "cost_strategy.csv"}


def load(figures_dir):
    """{what: rows} for every data file present in figures_dir; run metadata under meta_*."""
    data = {}
    for key, name in DATA.items():
        path = os.path.join(figures_dir, name)
        if os.path.exists(path):
            data[key], data[f"meta_{key}"] = records.read_points(path), records.read_extras(path)
    for key, name in COST.items():
        path = os.path.join(figures_dir, name)
        if os.path.exists(path):
            with open(path, newline="") as f:
                data[key] = list(csv.DictReader(f))
    return data


def _source(data, key, **where):
    """The table's source line: its data file and the run(s) its rows come from."""
    runs = []
    for p, meta in zip(data.get(key, ()), data.get(f"meta_{key}", ())):
        if all(getattr(p, k) == v for k, v in where.items()):
            peak = meta.get("matmul_peak_gflops")
            peak = f", matmul peak {float(peak):.0f} GFLOP/s in that run" if peak else ""
            runs.append(f"grid `{meta.get('grid', '?')}`{peak}, {meta.get('finished', '?')}")
    return f"_From `docs/figures/{DATA[key]}` ({'; '.join(dict.fromkeys(runs)) or '?'})._"


def _at(data, key="points", **where):
    """The Points of `key` matching every field in `where` (label: the row's kernel label)."""
    want = where.pop("label", None)
    return [p for p in data.get(key, ()) if (want is None or records.label(p) == want)
            and all(getattr(p, k) == v for k, v in where.items())]


def _one(data, key="points", **where):
    found = _at(data, key, **where)
    return found[0] if len(found) == 1 else None


def _tokens(t):
    if t >= 1 << 20 and t % (1 << 20) == 0:
        return f"{t >> 20}M"
    return f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t)


def _mib(b):
    return f"{b / 2**20:,.1f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _roles():
    """(one-device baseline, default local kernel, default strategy, linear family)."""
    return (registry.baseline("local"), registry.DEFAULT_LOCAL, registry.DEFAULT_STRATEGY,
            registry.names("linear")[0])


# ----------------------------------------------------------------------------- suite tables


def single(data):
    """One device, forward+backward: every kernel beside the baseline, per heads and T."""
    base = _roles()[0]
    points = _at(data, part="single", mode="fwd+bwd")
    impls = sorted({records.label(p) for p in points}, key=lambda i: (i != base, i))
    rows = []
    for h, kv in sorted({(p.heads, p.kv_heads) for p in points}):
        for t in sorted({p.seq_len for p in points if p.heads == h}):
            at = {records.label(p): p for p in points if (p.heads, p.kv_heads, p.seq_len) ==
                  (h, kv, t)}
            ref, row = at.get(base), [f"{h}/{kv}", _tokens(t)]
            for impl in impls:
                p = at.get(impl)
                row.append("–" if p is None else f"{p.seconds:.3f}" if p.seconds is not None
                           else "over budget")
                if impl != base:
                    faster = p is not None and ref is not None and ref.seconds and p.seconds
                    row.append(f"{ref.seconds / p.seconds:.1f}x" if faster else "–")
            rows.append(row + [_mib(at[i].temp_bytes) if i in at else "–" for i in impls])
    if not rows:
        return None
    header = ["heads", "T"] + sum(([f"{i} s"] if i == base else [f"{i} s", f"vs {base}"]
                                   for i in impls), []) + [f"{i} MiB" for i in impls]
    worst = max(p.max_rel_error for p in points)
    return "\n".join([
        _table(header, rows), "",
        f"Causal forward+backward in a one-device process, batch 1, head_dim 64, float32;"
        f" median seconds, speed-up over `{base}` in the same rounds, compiled temporary"
        f" memory. \"over budget\": the compiled program needs more than half the machine's"
        f" memory and was not run. Largest error of any kernel here against float64:"
        f" {worst:.1e}.", _source(data, "points", part="single")])


def mesh(data):
    """The mesh at its longest length: every strategy and layout against the peer."""
    linear_family = set(registry.names("linear"))
    points = [p for p in _at(data, part="mesh", mode="fwd+bwd") if p.seconds is not None
              and p.impl.split("/")[0] not in linear_family]
    if not points:
        return None
    n = max(p.n for p in points)
    t = max(p.seq_len for p in points if p.n == n)
    points = [p for p in points if (p.n, p.seq_len) == (n, t)]
    heads = sorted({(p.heads, p.kv_heads) for p in points}, key=lambda hk: (hk[0] != hk[1], hk))
    strategy = _roles()[2]
    kernels = sorted({(records.label(p), p.layout) for p in points},
                     key=lambda k: (k[0] not in registry.names(), k[0] != strategy, k))
    rows = []
    for label, layout in kernels:
        row = [label, layout]
        for h, kv in heads:
            p = _one(data, part="mesh", label=label, layout=layout, n=n, heads=h, kv_heads=kv,
                     seq_len=t, mode="fwd+bwd")
            peer = _one(data, part="mesh", impl=PEER, n=n, heads=h, kv_heads=kv, seq_len=t,
                        mode="fwd+bwd")
            if p is None or p.seconds is None:
                row += ["–"] * 4
                continue
            ratio = f"{p.seconds / peer.seconds:.2f}" if peer and peer.seconds else "–"
            sent = "–" if p.sent_bytes is None else _mib(p.sent_bytes)
            row += [f"{p.seconds:.2f}", ratio, _mib(p.temp_bytes), sent]
        rows.append(row)
    header = ["impl", "layout"]
    for h, kv in heads:
        header += [f"{h}/{kv} heads: s", f"/ {PEER}", "MiB per device", "MiB sent"]
    return "\n".join([
        _table(header, rows), "",
        f"Causal forward+backward at T={t:,} on {n} emulated CPU devices, batch 1, head_dim"
        f" 64, float32: median seconds, time relative to the `{PEER}` package's (below"
        f" 1 is faster), compiled temporaries per device and the MiB a device sends in the"
        f" compiled program's collectives (`lca.bench.hlo`; `usp` on (ulysses {A2A}) x"
        f" (sequence {n // A2A}); – where a strategy cannot split those heads over the devices)."
        f" Times on this shared two-core machine do not carry to a pod;"
        f" the bytes, the memory and the FLOPs do (the cost model predicts from them).",
        _source(data, "points", part="mesh")])


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
    return "\n".join(lines + [_source(data, "points", part="linear")])


# ----------------------------------------------------------------------------- against the model


def _predicted(p):
    """The cost model's critical-path FLOPs and its tile count for a balance Point."""
    problem = cm.Problem(p.impl, p.layout, p.seq_len, p.heads, p.kv_heads, 64, p.n, itemsize=4,
                         block_q=p.block, block_k=p.block)
    f, b = cm.step_flops(problem)
    bq, bk = problem.blocks()
    flops = float((f + b).max(1).sum())
    return flops, flops / (14 * p.heads * bq * bk * 64)  # 4 forward + 10 backward per tile


def balance_rows(data):
    """[(layout, tile, critical s, measured vs contiguous, predicted vs contiguous, tiles)]."""
    points = {p.layout: p for p in _at(data, "balance", part="balance")}
    if "contiguous" not in points:
        return []
    base_s, (base_f, _) = points["contiguous"].seconds, _predicted(points["contiguous"])
    return [(name, p.block, p.seconds, p.seconds / base_s, _predicted(p)[0] / base_f,
             _predicted(p)[1]) for name, p in points.items()]


def balance(data):
    """Ring load balance: measured critical paths against the cost model's prediction."""
    rows = balance_rows(data)
    if not rows:
        return None
    p = _at(data, "balance", part="balance")[0]
    body = [[name, block, f"{s:.2f}", f"{measured:.3f}", f"{predicted:.3f} ({tiles:.0f})",
             f"{100 * (predicted / measured - 1):+.1f}%"]
            for name, block, s, measured, predicted, tiles in rows]
    return "\n".join([
        _table(["layout", "tile", "critical path (s)", "measured vs contiguous",
                "predicted vs contiguous (tiles)", "predicted / measured - 1"], body), "",
        f"Causal, T={p.seq_len:,}, n={p.n}, heads {p.heads}/{p.kv_heads}, head_dim 64: every"
        f" (step, rank) ring step's forward+backward kernels timed in a one-device process"
        f" (fastest of the repeats); critical path = sum over steps of the slowest rank."
        f" Predicted: `tools/cost_model.py` from FLOPs alone.", _source(data, "balance")])


def memory_check(data):
    """Compiled temporaries of the default strategy (zigzag) against the cost model's."""
    strategy = _roles()[2]
    points = sorted((p for p in _at(data, part="mesh", impl=strategy, layout="zigzag",
                                    mode="fwd+bwd", label=strategy)
                     if p.n == max(q.n for q in _at(data, part="mesh"))),
                    key=lambda p: (p.heads != p.kv_heads, p.seq_len))
    if not points:
        return None
    body = []
    for p in points:
        model = cm.memory_bytes(cm.Problem(strategy, "zigzag", p.seq_len, p.heads, p.kv_heads,
                                           64, p.n, itemsize=4))["temporaries"]
        body.append([f"{p.heads}/{p.kv_heads}", f"{p.seq_len:,}", _mib(p.temp_bytes),
                     _mib(model), f"{model / p.temp_bytes:.2f}"])
    return "\n".join([
        _table(["heads", "T", "compiled MiB per device", "model MiB", "model / compiled"], body),
        "", f"`{strategy}` in the zigzag layout, causal forward+backward, float32, head_dim 64,"
        f" n={points[0].n}: the suite's compiled temporaries and `tools/cost_model.py`'s"
        f" estimate.", _source(data, "points", part="mesh")])


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
        "_From `docs/figures/cost_overlap.csv` (`tools/cost_report.py`)._"])


def step_time(data):
    """The cost model's step time at the longest length plotted, per hardware and kernel."""
    rows = data.get("step_time")
    if not rows:
        return None
    t = max(int(r["seq_len"]) for r in rows)
    body = [[r["hardware"], r["kernel"], r["layout"], f"{float(r['seconds']):.2f}",
             f"{float(r['balance']):.2f}", "yes" if r["hidden_fwd"] == "True" else "no",
             f"{int(r['temp_bytes']) / 1e9:.1f}"] for r in rows if int(r["seq_len"]) == t]
    return "\n".join([
        _table(["profile", "kernel", "layout", f"step s at {_tokens(t)}", "balance",
                "forward hops hidden", "temporaries GB"], body), "",
        "_From `docs/figures/cost_step_time.csv` (`tools/cost_report.py`)._"])


def strategy(data):
    """When all-to-all beats the ring: the cost model's fastest split per length and mesh."""
    rows = data.get("strategy")
    if not rows:
        return None
    panels = list(dict.fromkeys((r["hardware"], r["devices"]) for r in rows))
    lengths = sorted({int(r["seq_len"]) for r in rows})
    body = []
    for hw, devices in panels:
        mine = [r for r in rows if (r["hardware"], r["devices"]) == (hw, devices)]
        cells = []
        for t in lengths:
            at = [r for r in mine if int(r["seq_len"]) == t]
            best = next(r for r in at if r["fastest"] == "True")
            ring = next(r for r in at if r["option"] == registry.DEFAULT_STRATEGY)
            cells.append(f"{best['option']} ({float(ring['seconds']) / float(best['seconds']):.2f})")
        body.append([f"{hw} x {devices}"] + cells)
    return "\n".join([
        _table(["mesh"] + [_tokens(t) for t in lengths], body), "",
        "The fastest option by the cost model (predicted causal attention forward+backward, heads"
        " 32/8, head_dim 128, bf16, zigzag, efficiency 0.5), and in brackets the ring's"
        " predicted time over it. The a2a degree of `usp` is the all-to-all axis; the ring"
        " gets the rest of the devices.",
        "_From `docs/figures/cost_strategy.csv` (`tools/cost_report.py`)._"])


# ----------------------------------------------------------------------------- training


def _tokens_long(t):
    return f"{t / 1e6:.2f}M tokens" if t >= 10**6 else f"{t:,} tokens"


def train(data):
    speed, context = _at(data, "train", part="train"), _at(data, "train", part="context")
    if not speed and not context:
        return None
    base = _roles()[0]
    dense = next((p.seq_len for p in context if p.impl == base), None)
    by_speed, by_context = {p.impl: p for p in speed}, {p.impl: p for p in context}
    rows = [[kernel,
             f"{s.batch * s.seq_len / s.seconds:,.0f}" if (s := by_speed.get(kernel)) else "–",
             f"{c.seq_len:,}" if (c := by_context.get(kernel)) else "–",
             f"{c.total_bytes / 2**30:.2f}" if c else "–",
             f"{c.seq_len / dense:.0f}x" if c and dense else "–"]
            for kernel in dict.fromkeys(list(by_speed) + list(by_context))]
    t = speed[0].seq_len if speed else "?"
    n = speed[0].n if speed else "?"
    return "\n".join([
        _table(["kernel", f"tokens/s at T={t:,}", "longest context (tokens)",
                "GiB per device there", f"vs {base}"], rows), "",
        f"Default model (`configs/passkey.py`). Speed: training steps on the (sequence={n})"
        f" mesh, median of the timed steps. Longest context: one training step within 20 GiB"
        f" per device on the config's own mesh, from compiled memory analysis (nothing run).",
        _source(data, "train")])


def questions(data):
    """The README's five questions, each answered from the data."""
    if not {"points", "balance", "train"} <= set(data) or not balance_rows(data):
        return None
    base, mine, _, lin = _roles()
    one = lambda impl, **w: _one(data, part="single", label=impl, mode="fwd+bwd", **w)
    h, kv = 4, 4
    lens = sorted({p.seq_len for p in _at(data, part="single", label=base, heads=h)})
    ran = [t for t in lens if one(base, heads=h, kv_heads=kv, seq_len=t).seconds]
    time = lambda impl, t, h=h, kv=kv: one(impl, heads=h, kv_heads=kv, seq_len=t).seconds
    faster = ", ".join(f"{time(base, t) / time(mine, t):.1f}x at {_tokens(t)}"
                       for t in ran if t >= 2048)
    faster += "".join(f" (8/2 heads: {time(base, t, 8, 2) / time(mine, t, 8, 2):.1f}x at"
                      f" {_tokens(t)})" for t in ran[-1:] if one(base, heads=8, kv_heads=2,
                                                                 seq_len=t))
    x, b = (one(i, heads=h, kv_heads=kv, seq_len=ran[-1]) for i in (base, mine))
    memory = f"{x.temp_bytes / b.temp_bytes:.0f}x less temporary memory at {_tokens(ran[-1])}"
    over = [t for t in lens if not one(base, heads=h, kv_heads=kv, seq_len=t).fits]
    if over:
        x, b = (one(i, heads=h, kv_heads=kv, seq_len=over[0]) for i in (base, mine))
        memory += (f"; at {_tokens(over[0])} dense needs {x.temp_bytes / 2**30:.1f} GiB and is not"
                   f" run, `{mine}` {b.temp_bytes / 2**20:.0f} MiB"
                   f" ({x.temp_bytes / b.temp_bytes:.0f}x less)")
    context = sorted(_at(data, "train", part="context"), key=lambda p: p.impl != base)
    dense = next((p.seq_len for p in context if p.impl == base), None)
    reach = ", ".join(f"`{p.impl}` {_tokens_long(p.seq_len)}" + (
        f" ({p.seq_len / dense:.0f}x)" if dense and p.impl != base else "") for p in context)
    bal = {row[0]: row for row in balance_rows(data)}
    layout = (f"`zigzag`: ring critical path {bal['zigzag'][3]:.2f}x contiguous's (cost model"
              f" {bal['zigzag'][4]:.2f}); `striped` {bal['striped'][3]:.2f}x"
              f" ({bal['striped'][4]:.2f})")
    ratios = [(t, one(lin, heads=h, kv_heads=kv, seq_len=t), one(mine, heads=h, kv_heads=kv,
                                                                  seq_len=t)) for t in lens]
    ratios = [(t, a.seconds / b.seconds) for t, a, b in ratios if a and b and a.seconds]
    wins = [t for t, r in ratios if r < 1]
    per_token = sorted((p for p in _at(data, part="linear", n=1, mode="fwd+bwd") if p.seconds),
                       key=lambda p: p.seq_len)
    linear_answer = (f"faster than `{mine}` forward+backward from {_tokens(min(wins))} tokens"
                     f" ({dict(ratios)[min(wins)]:.2f}x the time; {ratios[-1][1]:.2f}x at"
                     f" {_tokens(ratios[-1][0])})" if wins else f"`{mine}` was faster throughout")
    if per_token:
        a, z = per_token[0], per_token[-1]
        linear_answer += (f"; {1e6 * a.seconds / a.seq_len:.1f} µs/token at {_tokens(a.seq_len)},"
                          f" {1e6 * z.seconds / z.seq_len:.1f} at {_tokens(z.seq_len)}")
    rows = [
        ["How much faster than dense attention?",
         f"`{mine}` forward+backward against `jax.nn.dot_product_attention`: {faster}",
         "[one device](#one-device)"],
        ["How much less memory?", memory, "[one device](#one-device)"],
        ["How far past dense does the context go?",
         f"one training step in 20 GiB per device: {reach}" if reach
         else "not measured in this run (`--quick` skips the search)", "[training](#training-step)"],
        ["Which layout for causal training?", layout, "[ring](#ring-attention)"],
        ["When does linear attention win?", linear_answer, "[linear](#linear-attention)"],
    ]
    return _table(["question", "answer on this machine", "table"], rows)
