"""What a compiled program sends: its collectives read from the HLO text, loops multiplied out.

`sent_bytes(compiled.as_text())` is the bytes one device sends in one call:
a collective-permute sends its result; an all-gather or all-to-all over
groups of g devices (g - 1) / g of its result; a reduce-scatter g - 1 times
its result; an all-reduce 2 (g - 1) / g of it (a ring all-reduce). A
collective inside a while loop counts once per known trip. The benchmark
suite records it per point; `tests/test_cost_model.py` reads the same
parse to check `tools/cost_model.py`'s bytes and FLOPs.
"""

from __future__ import annotations

import math
import re

SIZES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "s32": 4, "u32": 4,
         "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
COLLECTIVES = ("collective-permute", "all-gather", "reduce-scatter", "all-reduce", "all-to-all")


def split_type(rest):
    """'f32[2,3]{1,0} dot(...)' or '(s32[], ...) while(...)' -> (type, remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                return rest[:i + 1], rest[i + 2:]
    head, _, tail = rest.partition(" ")
    return head, tail


def parse(text):
    """({computation: [(name, type, opcode, line)]}, {instruction: dims}, entry name)."""
    comps, dims, entry, current = {}, {}, None, None
    for line in text.splitlines():
        header = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = header.group(2)
            comps[current] = []
            entry = current if header.group(1) else entry
            continue
        ins = re.match(r"^\s+(?:ROOT )?%(\S+) = (.*)$", line)
        if ins and current:
            typ, rest = split_type(ins.group(2))
            opcode = re.match(r"([\w\-]+)\(", rest).group(1)
            comps[current].append((ins.group(1), typ, opcode, line))
            shape = re.match(r"^\w+\[([\d,]*)\]", typ)
            if shape:
                dims[ins.group(1)] = [int(x) for x in shape.group(1).split(",") if x]
    return comps, dims, entry


def type_size(typ):
    """(elements, bytes) of an HLO type; a tuple's (an all-to-all's parts) summed."""
    parts = re.findall(r"(\w+)\[([\d,]*)\]", typ)
    assert parts and (typ.startswith("(") or len(parts) == 1), typ
    sizes = [(math.prod(int(x) for x in shape.split(",") if x), dtype) for dtype, shape in parts]
    return sum(n for n, _ in sizes), sum(n * SIZES[dtype] for n, dtype in sizes)


def group_size(line):
    """Devices of a collective's replica group: {{0,4},{1,5}}, iota [groups,size]<=[n], or
    mesh['a'=2,'b'=4](, device_ids=...) {'b'} (the product of the named axes)."""
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if listed:
        return len(listed.group(1).split(","))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    if mesh:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if not iota:
        raise ValueError(f"no replica groups in: {line[:200]}")
    return int(iota.group(2))


def callees(op, line):
    """[(computation, times per execution)] an instruction runs: a while body its known trip
    count (None when unknown: a loop whose bound is data), a call or fusion once (a
    conditional's branches: see `branches`)."""
    if op == "while":
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        return [(re.search(r"body=%([\w.\-]+)", line).group(1),
                 int(trip.group(1)) if trip else None)]
    return [(name, 1) for name in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line)]


def branches(line):
    """A conditional's branch computations."""
    found = re.search(r"branch_computations=\{([^}]*)\}", line).group(1)
    return [b.strip().lstrip("%") for b in found.split(",")]


def share(op, line):
    """Bytes sent per byte of the collective's result."""
    if op == "collective-permute":
        return 1.0
    g = group_size(line)
    return {"all-gather": (g - 1) / g, "all-to-all": (g - 1) / g, "reduce-scatter": g - 1,
            "all-reduce": 2 * (g - 1) / g}[op]


def is_collective(op):
    return op in COLLECTIVES or op.endswith("-start") and op[:-6] in COLLECTIVES


def sent_bytes(text):
    """Bytes one device sends in one execution of the compiled module (module docstring);
    a conditional's branches each counted as if taken (lca's kernels put none there)."""
    comps, _, entry = parse(text)

    def walk(comp, times):
        total = 0.0
        for _, typ, op, line in comps[comp]:
            if is_collective(op):
                total += times * type_size(typ)[1] * share(op.removesuffix("-start"), line)
            inner = [(b, 1) for b in branches(line)] if op == "conditional" else callees(op, line)
            for c, trip in inner:
                once = walk(c, times)
                if trip is None and once:
                    raise ValueError(f"collectives in a while loop without a known trip"
                                     f" count: {line[:200]}")
                total += once * (trip or 0)
        return total

    return int(round(walk(entry, 1)))
