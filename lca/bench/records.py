"""Benchmark rows: one dataclass per measured point, a CSV writer and reader, a table.

Every benchmark module writes its rows with `write_csv`; the suite's rows are
`Point`s, one per (part, impl, layout, mesh size, heads, length, mode).
"""

from __future__ import annotations

import csv
import dataclasses


@dataclasses.dataclass
class Point:
    part: str            # "single", "mesh" or "linear"
    impl: str            # kernel name in the suite's registry
    layout: str          # token layout on a mesh; "-" on one device
    n: int               # devices on the sequence axis (1: one device)
    heads: int
    kv_heads: int
    seq_len: int
    mode: str            # "fwd" or "fwd+bwd"
    flops: int           # useful FLOPs (causal), whole problem; compile-time, deterministic
    temp_bytes: int      # compiled temporary memory, per device
    fits: bool           # within the memory budget; a point that does not fit is not run
    seconds: float | None = None      # median over the repeats
    seconds_min: float | None = None  # spread: fastest and slowest repeat
    seconds_max: float | None = None
    peak_fraction: float | None = None  # useful FLOP/s over the matmul peak of this run
    baseline: str = ""                  # the impl this point is compared with
    vs_baseline: float | None = None    # baseline seconds / seconds: > 1 is faster
    max_rel_error: float | None = None  # vs the float64 reference at check_len
    check_len: int | None = None


# Max relative error against float64 above which a row is marked WRONG: the
# float32 tolerance the tests hold every kernel to (tests/attention_cases.py).
TOLERANCE = 2e-5


def write_csv(path, rows, extra=None):
    """Rows of one dataclass type to `path`; `extra`: {column: value} repeated on every row."""
    rows = list(rows)
    extra = extra or {}
    fields = [f.name for f in dataclasses.fields(rows[0])] + list(extra)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(fields)
        for r in rows:
            values = [getattr(r, name) for name in fields[:len(fields) - len(extra)]]
            out.writerow(["" if x is None else x for x in values + list(extra.values())])


def read_points(path):
    """The `Point`s of a suite CSV (the extra columns are dropped)."""
    types = {f.name: f.type for f in dataclasses.fields(Point)}
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            values = {}
            for name, kind in types.items():
                text = raw[name]
                if "int" in kind and "float" not in kind:
                    values[name] = int(text) if text else None
                elif "float" in kind:
                    values[name] = float(text) if text else None
                elif kind == "bool":
                    values[name] = text == "True"
                else:
                    values[name] = text
            rows.append(Point(**values))
    return rows


def _num(x, fmt):
    return "" if x is None else format(x, fmt)


def format_points(rows) -> str:
    """A fixed-width table: one line per point, the spread and the correctness beside the time."""
    head = (f"{'part':>6} {'impl':>18} {'layout':>10} {'n':>2} {'h/kv':>5} {'T':>8} {'mode':>7}"
            f" {'median s':>9} {'min-max s':>15} {'x base':>6} {'%peak':>6} {'temp MiB':>9}"
            f" {'max rel err':>11}")
    lines = [head]
    for r in rows:
        start = (f"{r.part:>6} {r.impl:>18} {r.layout:>10} {r.n:>2} {f'{r.heads}/{r.kv_heads}':>5}"
                 f" {r.seq_len:>8} {r.mode:>7}")
        mib = f"{r.temp_bytes / 2**20:9.1f}"
        err = _num(r.max_rel_error, ".1e")
        if r.max_rel_error is not None and r.max_rel_error > TOLERANCE:
            err += " WRONG"
        if not r.fits:
            lines.append(f"{start} {'does not fit in the memory budget':>48} {mib} {err:>11}")
            continue
        spread = f"{r.seconds_min:.3f}-{r.seconds_max:.3f}"
        peak = "" if r.peak_fraction is None else f"{100 * r.peak_fraction:5.1f}%"
        lines.append(f"{start} {r.seconds:9.3f} {spread:>15} {_num(r.vs_baseline, '.2f'):>6}"
                     f" {peak:>6} {mib} {err:>11}")
    return "\n".join(lines)
