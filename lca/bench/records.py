"""The benchmarks' one row type, `Point`, its CSV writer and reader, and a text table.

Every part writes Points: `single`, `mesh` and `linear` (the suite: one row
per kernel, layout, mesh size, heads, length and mode), `balance` (one ring
layout's critical path), `train` (one training step), `context` (the
longest context whose training step fits a memory budget) and `decode` (one
decode step against a cache of L tokens, or one prefill).
"""

from __future__ import annotations

import csv
import dataclasses
import os


@dataclasses.dataclass
class Point:
    part: str            # "single", "mesh", "linear", "balance", "train", "context" or "decode"
    impl: str            # a registry name (a strategy, a local kernel, linear[/algorithm]) or a peer
    layout: str          # token layout on a mesh; "-" on one device
    n: int               # devices on the sequence axis (1: one device)
    heads: int
    kv_heads: int
    seq_len: int         # context: the longest length that fits
    mode: str            # "fwd", "fwd+bwd", "train", "decode" (one step) or "prefill"
    flops: int | None    # useful FLOPs (causal), whole problem; compile-time, deterministic
    temp_bytes: int      # compiled temporary memory, per device
    fits: bool           # within the memory budget; a point that does not fit is not run
    local: str = ""      # the local kernel a strategy ran
    block: int | None = None          # tile length, where the run chose one
    batch: int = 1
    total_bytes: int | None = None    # compiled arguments + outputs + temporaries - aliased
    sent_bytes: int | None = None     # a device's collectives per call (lca.bench.hlo)
    seconds: float | None = None      # median over the repeats (balance: critical path)
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


def part_grid(grid, *, quick, repeats, grids, out_dir):
    """The grid a part's `run` measures and its name for the CSV: `grid` if given, else
    `grids` = (quick grid, default grid) by `quick`; `repeats` overrides its repeats.
    Creates out_dir."""
    grid = grid or grids[0 if quick else 1]
    if repeats:
        grid = dataclasses.replace(grid, repeats=repeats)
    os.makedirs(out_dir, exist_ok=True)
    name = "quick" if grid == grids[0] else "default" if grid == grids[1] else "custom"
    return grid, name


def write_csv(path, rows, extra=None):
    """Points to `path`; `extra`: run metadata, {column: value} for every row or a list of
    such dicts, one per row (rows kept from an earlier run keep theirs)."""
    extras = extra if isinstance(extra, list) else [extra or {}] * len(rows)
    columns = list(dict.fromkeys(k for e in extras for k in e))
    fields = [f.name for f in dataclasses.fields(Point)]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(fields + columns)
        for r, e in zip(rows, extras):
            values = [getattr(r, name) for name in fields] + [e.get(c) for c in columns]
            out.writerow(["" if x is None else x for x in values])


def _value(kind, text):
    if "int" in kind and "float" not in kind:
        return int(text) if text else None
    if "float" in kind:
        return float(text) if text else None
    if kind == "bool":
        return text == "True"
    return text


def read_points(path):
    """The Points of a CSV (extra columns dropped; missing ones take their defaults)."""
    fields = {f.name: f for f in dataclasses.fields(Point)}
    with open(path, newline="") as f:
        return [Point(**{name: _value(fields[name].type, text) for name, text in raw.items()
                         if name in fields and text is not None})
                for raw in csv.DictReader(f)]


def read_extras(path):
    """The run metadata of every row of a CSV, aligned with `read_points`."""
    fields = {f.name for f in dataclasses.fields(Point)}
    with open(path, newline="") as f:
        return [{k: v for k, v in raw.items() if k not in fields} for raw in csv.DictReader(f)]


def _num(x, fmt):
    return "" if x is None else format(x, fmt)


def label(p) -> str:
    """impl, with the local kernel a strategy ran when it is not the default one."""
    from lca.kernels import registry  # noqa: PLC0415 (plots and tables need no JAX otherwise)

    return p.impl if p.local in ("", registry.DEFAULT_LOCAL) else f"{p.impl}[{p.local}]"


def format_points(rows) -> str:
    """A fixed-width table: one line per point, the spread and the correctness beside the time."""
    head = (f"{'part':>7} {'impl':>18} {'layout':>10} {'n':>2} {'h/kv':>5} {'T':>8} {'mode':>7}"
            f" {'median s':>9} {'min-max s':>15} {'x base':>6} {'%peak':>6} {'temp MiB':>9}"
            f" {'max rel err':>11}")
    lines = [head]
    for r in rows:
        start = (f"{r.part:>7} {label(r):>18} {r.layout:>10} {r.n:>2}"
                 f" {f'{r.heads}/{r.kv_heads}':>5} {r.seq_len:>8} {r.mode:>7}")
        mib = f"{r.temp_bytes / 2**20:9.1f}"
        err = _num(r.max_rel_error, ".1e")
        if r.max_rel_error is not None and r.max_rel_error > TOLERANCE:
            err += " WRONG"
        if not r.fits or r.seconds is None:
            what = "not timed" if r.fits else "does not fit in the memory budget"
            lines.append(f"{start} {what:>48} {mib} {err:>11}")
            continue
        spread = ("" if r.seconds_min is None
                  else f"{r.seconds_min:.3f}-{r.seconds_max:.3f}")
        peak = "" if r.peak_fraction is None else f"{100 * r.peak_fraction:5.1f}%"
        lines.append(f"{start} {r.seconds:9.3f} {spread:>15} {_num(r.vs_baseline, '.2f'):>6}"
                     f" {peak:>6} {mib} {err:>11}")
    return "\n".join(lines)
