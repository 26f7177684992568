"""Key figures of a suite run, as text: the ratios the README quotes, computed from the rows."""

from __future__ import annotations

import collections

from lca.bench.records import TOLERANCE


def _index(points):
    return {(p.part, p.impl, p.layout, p.n, p.heads, p.kv_heads, p.seq_len, p.mode): p
            for p in points}


def _heads(points):
    return sorted({(p.heads, p.kv_heads) for p in points})


def single_device(points):
    rows = [p for p in points if p.part == "single"]
    at = _index(rows)
    lines = []
    for h, kv in _heads(rows):
        for mode in ("fwd", "fwd+bwd"):
            key = lambda impl, t: ("single", impl, "-", 1, h, kv, t, mode)
            lens = sorted({p.seq_len for p in rows})
            parts = []
            for t in lens:
                xla, blk = at.get(key("xla", t)), at.get(key("blockwise", t))
                if xla is None or blk is None or blk.seconds is None:
                    continue
                speed = f"{xla.seconds / blk.seconds:.2f}x" if xla.seconds else "xla does not fit"
                parts.append(f"T={t}: {speed}, memory /{xla.temp_bytes / blk.temp_bytes:.1f}")
            if parts:
                lines.append(f"blockwise vs xla, h{h}/{kv} {mode}: " + "; ".join(parts))
            fit = [t for t in lens if key("xla", t) in at and at[key("xla", t)].fits]
            ran = [t for t in lens if key("blockwise", t) in at and at[key("blockwise", t)].fits]
            if fit and ran:
                lines.append(f"longest T measured, h{h}/{kv} {mode}: xla {max(fit)}"
                             f" (fits the budget), blockwise {max(ran)}")
            ratios = [(t, at[key("linear", t)].seconds / at[key("blockwise", t)].seconds)
                      for t in lens if key("linear", t) in at and key("blockwise", t) in at
                      and at[key("linear", t)].seconds and at[key("blockwise", t)].seconds]
            if ratios:
                wins = None
                for t, r in sorted(ratios, reverse=True):
                    if r > 1:
                        break
                    wins = t
                tail = f"; linear faster from T={wins} on" if wins else "; blockwise faster"
                lines.append(f"linear/blockwise time, h{h}/{kv} {mode}: "
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
            ra = [p.seconds for p in group if p.impl == "ringattention"]
            cells = []
            for p in sorted(group, key=lambda p: p.seconds):
                vs_ra = f", x ringattention {ra[0] / p.seconds:.2f}" if ra else ""
                base = "" if p.vs_baseline is None else f" x allgather {p.vs_baseline:.2f}"
                cells.append(f"{p.impl}/{p.layout} {p.seconds:.2f}s{base}{vs_ra}")
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


def key_figures(points) -> str:
    lines = single_device(points) + mesh(points) + linear(points)
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
