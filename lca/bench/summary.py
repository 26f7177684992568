"""Key figures of a suite run, as text: the ratios the README quotes, computed from the rows."""

from __future__ import annotations

import collections
import itertools

from lca.bench.records import TOLERANCE, label


def _index(points):
    return {(p.part, label(p), p.layout, p.n, p.heads, p.kv_heads, p.seq_len, p.mode): p
            for p in points}


def _heads(points):
    return sorted({(p.heads, p.kv_heads) for p in points})


def single_device(points):
    """Every one-device kernel against the baseline (speed, memory), and the linear family
    against the default local kernel (from which length it is faster)."""
    from lca.kernels import registry  # noqa: PLC0415

    rows = [p for p in points if p.part == "single"]
    at = _index(rows)
    base, mine, linear = registry.baseline("local"), registry.DEFAULT_LOCAL, registry.names("linear")
    lines = []
    for (h, kv), mode in itertools.product(_heads(rows), ("fwd", "fwd+bwd")):
        key = lambda impl, t: ("single", impl, "-", 1, h, kv, t, mode)
        lens = sorted({p.seq_len for p in rows})
        for impl in sorted({label(p) for p in rows} - {base}):
            cells = [(t, at.get(key(base, t)), at.get(key(impl, t))) for t in lens]
            cells = [(t, b, p) for t, b, p in cells if b and p and p.seconds]
            if cells:
                lines.append(f"{impl} vs {base}, h{h}/{kv} {mode}: " + "; ".join(
                    (f"T={t}: {b.seconds / p.seconds:.2f}x" if b.seconds
                     else f"T={t}: {base} does not fit")
                    + f", memory /{b.temp_bytes / max(p.temp_bytes, 1):.1f}"
                    for t, b, p in cells))
        for name in linear:
            ratios = [(t, at[key(name, t)].seconds / at[key(mine, t)].seconds) for t in lens
                      if key(name, t) in at and key(mine, t) in at
                      and at[key(name, t)].seconds and at[key(mine, t)].seconds]
            wins = None
            for t, r in sorted(ratios, reverse=True):
                if r > 1:
                    break
                wins = t
            if ratios:
                tail = f"; {name} faster from T={wins} on" if wins else f"; {mine} faster"
                lines.append(f"{name}/{mine} time, h{h}/{kv} {mode}: "
                             + ", ".join(f"T={t}: {r:.2f}" for t, r in ratios) + tail)
    best = collections.defaultdict(float)
    for p in rows:
        if p.peak_fraction:
            best[p.impl, p.mode] = max(best[p.impl, p.mode], p.peak_fraction)
    if best:
        lines.append("best fraction of the matmul peak: " + ", ".join(
            f"{impl} {mode} {100 * f:.0f}%" for (impl, mode), f in sorted(best.items())))
    return lines


def mesh(points):
    rows = [p for p in points if p.part == "mesh" and p.seconds is not None]
    if not rows:
        return []
    n = max(p.n for p in rows)
    lines = []
    for h, kv in _heads(rows):
        for mode in ("fwd", "fwd+bwd"):
            at_n = [p for p in rows if (p.n, p.heads, p.kv_heads, p.mode) == (n, h, kv, mode)]
            if not at_n:
                continue
            t = max(p.seq_len for p in at_n)
            group = [p for p in at_n if p.seq_len == t]
            peer = [p.seconds for p in group if p.impl == PEER]
            cells = []
            for p in sorted(group, key=lambda p: p.seconds):
                vs_peer = f", x {PEER} {peer[0] / p.seconds:.2f}" if peer else ""
                base = "" if p.vs_baseline is None else f" x {p.baseline} {p.vs_baseline:.2f}"
                cells.append(f"{label(p)}/{p.layout} {p.seconds:.2f}s{base}{vs_peer}")
            lines.append(f"mesh n={n} T={t} h{h}/{kv} {mode} (fastest first): "
                         + "; ".join(cells))
    return lines


def linear(points):
    rows = sorted((p for p in points if p.part == "linear" and p.seconds is not None),
                  key=lambda p: (p.mode, p.n, p.seq_len))
    lines = []
    for mode in ("fwd", "fwd+bwd"):
        one = [p for p in rows if p.mode == mode and p.n == 1]
        if one:
            lines.append(f"linear {mode} us/token: " + ", ".join(
                f"T={p.seq_len}: {1e6 * p.seconds / p.seq_len:.2f}" for p in one))
        par = [p for p in rows if p.mode == mode and p.n > 1]
        if par:
            lines.append(f"linear sequence parallel {mode} n={par[0].n} T={par[0].seq_len}: "
                         + ", ".join(f"{p.impl} {p.seconds:.2f}s" for p in par))
    return lines


def balance_and_training(points):
    lines = []
    ring = {p.layout: p for p in points if p.part == "balance"}
    if "contiguous" in ring:
        lines.append("ring critical path vs contiguous: " + ", ".join(
            f"{name} {p.seconds / ring['contiguous'].seconds:.3f}" for name, p in ring.items()))
    speed = [p for p in points if p.part == "train"]
    if len(speed) > 1:
        tokens = [p.batch * p.seq_len / p.seconds for p in speed]
        lines.append(f"training tokens/s at T={speed[0].seq_len}: " + ", ".join(
            f"{p.impl} {t:,.0f}" for p, t in zip(speed, tokens))
            + f"; {speed[0].impl} / {speed[-1].impl}: {tokens[0] / tokens[-1]:.2f}x")
    context = [p for p in points if p.part == "context"]
    if context:
        lines.append("longest context in budget: " + ", ".join(
            f"{p.impl} {p.seq_len:,d}" for p in context))
    return lines


def key_figures(points) -> str:
    lines = (single_device(points) + mesh(points) + linear(points)
             + balance_and_training(points))
    bad = [p for p in points if p.max_rel_error is not None and p.max_rel_error > TOLERANCE]
    lines.append(f"correctness: every kernel within {TOLERANCE:g} of the float64 reference"
                 if not bad
                 else "WRONG against the float64 reference: " + ", ".join(
                     sorted({f"{p.impl}/{p.layout} ({p.max_rel_error:.1e})" for p in bad})))
    return "\n".join(lines)


def _outside_by(p, q):
    """How far p's median lies outside q's min-max spread, relative to the nearer edge (0: in)."""
    if q.seconds_min <= p.seconds <= q.seconds_max:
        return 0.0
    edge = q.seconds_min if p.seconds < q.seconds_min else q.seconds_max
    return abs(p.seconds / edge - 1)


PEER = "ringattention"


def compare(previous, points) -> str:
    """Against an earlier run of the same grid: compile-time figures must be identical;
    a median outside the earlier run's min-max spread (and the earlier median outside
    this run's) is listed, with how far outside."""
    old = _index(previous)
    same, differ, outside, common, timed = 0, [], [], 0, 0
    for key, p in _index(points).items():
        q = old.get(key)
        if q is None:
            continue
        common += 1
        if (p.flops, p.temp_bytes, p.fits) == (q.flops, q.temp_bytes, q.fits):
            same += 1
        else:
            differ.append(f"{'/'.join(map(str, key))}: flops {q.flops}->{p.flops},"
                          f" temp {q.temp_bytes}->{p.temp_bytes}")
        if p.seconds is None or q.seconds is None:
            continue
        timed += 1
        by = min(_outside_by(p, q), _outside_by(q, p))
        if by > 0:
            outside.append((by, f"{'/'.join(map(str, key))} {q.seconds:.3f}->{p.seconds:.3f}s"
                                f" ({100 * by:.0f}% outside)"))
    lines = [f"against the previous run: {common} common points; FLOPs, temp bytes and fit"
             f" identical for {same}" + (", differ: " + "; ".join(differ) if differ else "")]
    far = sum(by > 0.1 for by, _ in outside)
    lines.append(f"medians inside the other run's min-max spread: {timed - len(outside)} of"
                 f" {timed}; outside by up to 10%: {len(outside) - far}, by more: {far}")
    for _, text in sorted(outside, reverse=True)[:20]:
        lines.append(f"  {text}")
    return "\n".join(lines)
