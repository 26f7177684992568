"""The benchmark suite: every kernel and layout, forward and forward+backward, side by side.

    python experiments/bench.py [--quick] [--part single,mesh,linear] [--out DIR]

Parts (dimension legend: T length, n devices on the sequence axis, h/kv
query/key-value heads; batch 1, head_dim 64, float32, causal), over the
kernels `lca.bench.kernels.default_kernels` reads from the registry:

  single  one device, in a process that has one device (as a user calling
          `lca.attention` has): every local kernel (the dense `xla` is the
          baseline) and linear attention, over T.
  mesh    the emulated CPU mesh: every strategy over every local kernel in its
          layouts (`allgather` is the baseline), the `ringattention` package's
          ring, and sequence-parallel linear; over T at n = 8, and over n at one T.
  linear  linear attention on one device at long T, and its three state
          exchanges at one long T on the mesh.

Every point is compiled first: its temporary memory comes from the compiled
executable, and a point over the memory budget (a fixed fraction of the
machine's physical memory, so the same points run every time) is recorded as
"does not fit" with its bytes, not run. Points that are compared (same part,
n, heads, T and mode) are timed round-robin in the same rounds; each row has
the median and the min-max spread over the rounds, useful FLOPs, the fraction
of the matmul peak (a 2048x2048 float32 matmul in a one-device process,
fastest of ten, at the start and the end of the run; emulated mesh devices
share the same cores, so on a mesh it is the fraction of the machine), and
the ratio to its part's baseline; on a mesh, the bytes a device sends in the
compiled program's collectives (`lca.bench.hlo`). Beside it: the kernel's max relative error
against the float64 reference (`check`), so a fast wrong kernel cannot win:
a row above `records.TOLERANCE` is marked WRONG.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

import lca
from lca import layouts
from lca.bench import kernels as bench_kernels
from lca.bench import hlo, timing
from lca.bench.records import Point
from lca.parallel import make_mesh

AXIS = bench_kernels.AXIS
MODES = ("fwd", "fwd+bwd")
PARTS = ("single", "mesh", "linear")


@dataclasses.dataclass(frozen=True)
class Grid:
    single_lens: tuple[int, ...]
    heads: tuple[tuple[int, int], ...]   # (heads, kv_heads) pairs
    mesh_lens: tuple[int, ...]           # at n = mesh_devices
    mesh_sizes: tuple[int, ...]          # every n, at mesh_sizes_len, first heads pair
    mesh_sizes_len: int
    linear_lens: tuple[int, ...]         # linear on one device
    linear_parallel_len: int             # sequence-parallel linear, n = mesh_devices
    mesh_heads: tuple[tuple[int, int], ...] | None = None  # the mesh part's; None: heads
    repeats: int = 3
    mesh_devices: int = 8
    head_dim: int = 64
    check_len: int = 256                 # the correctness check's length (tiles scaled)


# The mesh part takes 8 heads, so an all-to-all over the 8 devices has one head each.
QUICK = Grid(single_lens=(512, 1024, 2048), heads=((4, 4), (8, 2)), mesh_lens=(1024, 2048),
             mesh_sizes=(2, 8), mesh_sizes_len=2048, linear_lens=(4096, 16384),
             linear_parallel_len=16384, mesh_heads=((8, 8), (8, 2)), repeats=2)
DEFAULT = Grid(single_lens=(512, 1024, 2048, 4096, 8192, 16384), heads=((4, 4), (8, 2)),
               mesh_lens=(4096, 8192, 16384), mesh_sizes=(2, 4, 8), mesh_sizes_len=4096,
               linear_lens=(16384, 65536, 262144, 1048576), linear_parallel_len=262144,
               mesh_heads=((8, 8), (8, 2)))


@dataclasses.dataclass(frozen=True)
class Spec:
    part: str
    label: str   # the kernel's key in its part's table
    layout: str
    n: int
    heads: int
    kv_heads: int
    seq_len: int
    mode: str

    def devices(self, grid) -> int:
        """Devices the process running this point has: one, or the mesh's."""
        return 1 if self.n == 1 else grid.mesh_devices


def specs(grid, parts, kernels):
    """Every point of the grid, in the order they run (grouped by part, n, heads, T, mode)."""
    out = []
    for part in parts:
        table = kernels.get(part, {})
        if part == "single":
            where = [(1, t) for t in grid.single_lens]
        elif part == "mesh":
            sizes = [(grid.mesh_devices, t) for t in grid.mesh_lens]
            where = sizes + [(m, grid.mesh_sizes_len) for m in grid.mesh_sizes
                             if (m, grid.mesh_sizes_len) not in sizes]
        else:
            where = [(1, t) for t in grid.linear_lens]
            where += [(grid.mesh_devices, grid.linear_parallel_len)]
        heads = grid.mesh_heads or grid.heads if part == "mesh" else grid.heads
        for (h, kv), (n, t), mode in itertools.product(heads, where, MODES):
            if part == "mesh" and n != grid.mesh_devices and (h, kv) != heads[0]:
                continue  # the sweep over mesh sizes: first head configuration only
            for label, kernel in table.items():
                if kernel.sharded != (part == "mesh" or n > 1) or (h != kv and not kernel.gqa):
                    continue
                if kernel.accepts is not None and not kernel.accepts(h, kv, n):
                    continue
                out += [Spec(part, label, lay, n, h, kv, t, mode) for lay in kernel.layouts]
    return out


def point_flops(kernel, spec, head_dim):
    backward = spec.mode != "fwd"
    if kernel.kind == "linear":
        return timing.linear_flops(1, spec.seq_len, spec.heads, head_dim, head_dim,
                                   chunk_size=bench_kernels.LINEAR_CHUNK, backward=backward)
    return int(timing.attention_flops(1, spec.seq_len, spec.seq_len, spec.heads, head_dim,
                                      causal=True, backward=backward))


def program(fn, mode):
    """The one forward / forward+backward wrapper every point runs: jit of fn(q, k, v),
    or of ((<out, ct>, out), q/k/v gradients of <out, ct>) with out = fn(q, k, v)."""
    if mode == "fwd":
        return jax.jit(lambda q, k, v, ct: fn(q, k, v))

    def loss(q, k, v, ct):
        out = fn(q, k, v)
        return (out.astype(jnp.float32) * ct).sum(), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def inputs(heads, kv_heads, seq_len, head_dim, seed=0):
    """float32 numpy (q, k, v, output cotangent), batch 1."""
    rng = np.random.default_rng(seed)
    shape = lambda h: (1, seq_len, h, head_dim)
    return tuple(rng.standard_normal(shape(h)).astype(np.float32)
                 for h in (heads, kv_heads, kv_heads, heads))


def mesh_of(n):
    return make_mesh({AXIS: n}, devices=jax.devices()[:n])


def relative_error(got, ref):
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


@functools.lru_cache(maxsize=None)
def reference(kind, heads, kv_heads, seq_len, head_dim):
    """(inputs q, k, v, ct as float32 numpy; float64 output and q/k/v gradients)."""
    arrays = inputs(heads, kv_heads, seq_len, head_dim, seed=1)
    with jax.enable_x64(True):
        q, k, v, ct = (jnp.asarray(x, jnp.float64) for x in arrays)
        if kind == "linear":
            g = jnp.asarray(bench_kernels.log_decay(heads, np.float64))
            fn = lambda q, k, v: lca.linear_attention(q, k, v, log_decay=g, impl="quadratic")
        else:
            fn = lambda q, k, v: lca.attention(q, k, v, impl="reference", causal=True)
        out, vjp = jax.vjp(fn, q, k, v)
        results = tuple(np.asarray(x) for x in (out, *vjp(ct)))
    return arrays, results


def check(kernel, layout, n, heads, kv_heads, seq_len, head_dim):
    """The one correctness check: (forward error, forward+backward error), the max
    relative error against float64 of the output, and of the output and q/k/v gradients,
    on the same kernel and layout with tiles scaled to the short sequence."""
    arrays, ref = reference(kernel.kind, heads, kv_heads, seq_len, head_dim)
    fn = kernel.make(kernel.placed(mesh_of(n))[0] if kernel.sharded else None, layout, True)
    if layout == "-":
        perm, unperm = jnp.asarray, np.asarray
    else:
        shards = n // kernel.ring_share  # the layout's (the ring's) shards
        perm = lambda x: jnp.asarray(layouts.permute(x, layout, shards))
        unperm = lambda x: layouts.unpermute(np.asarray(x), layout, shards)
    q, k, v, ct = (perm(x) for x in arrays)
    (_, out), grads = program(fn, "fwd+bwd")(q, k, v, ct)
    fwd = relative_error(unperm(out), ref[0])
    return fwd, max([fwd] + [relative_error(unperm(g), r) for g, r in zip(grads, ref[1:])])


def _group_key(s):
    return (s.part, s.n, s.heads, s.kv_heads, s.seq_len, s.mode)


def _sent_bytes(compiled):
    """Bytes one device sends per call (`hlo.sent_bytes`); None where a loop's trip count is
    not in the HLO."""
    try:
        return hlo.sent_bytes(compiled.as_text())
    except ValueError:
        return None


def run(grid=DEFAULT, parts=PARTS, *, kernels=None, memory_budget=None, progress=True,
        devices=None, on_group=None):
    """Measures every point of `grid` in `parts`; returns the Points.

    kernels: {part: {label: Kernel}}, default `kernels.default_kernels()`.
    devices: run only the points whose process has this many devices
      (`Spec.devices`); None runs every point this process can.
    memory_budget: bytes the temporaries of a point may take on the machine (all
      devices together); default half the physical memory.
    on_group(points so far): called after every group (to save partial results).
    Peak fractions are left to the caller, who measures the peak (`timing`).
    """
    kernels = bench_kernels.default_kernels() if kernels is None else kernels
    baselines = bench_kernels.baselines()
    budget = memory_budget or timing.physical_memory_bytes() // 2
    todo = [s for s in specs(grid, parts, kernels) if devices in (None, s.devices(grid))]
    checks, rows = {}, []
    bar = tqdm(total=len(todo), desc="benchmark suite", unit="point", disable=not progress)
    for key, group in itertools.groupby(todo, key=_group_key):
        group = list(group)
        part, n, heads, kv_heads, seq_len, mode = key
        bar.set_postfix_str(f"{part} n={n} h={heads}/{kv_heads} T={seq_len} {mode}")
        mesh = mesh_of(n) if any(kernels[part][s.label].sharded for s in group) else None
        arrays = inputs(heads, kv_heads, seq_len, grid.head_dim)
        timed, points = {}, {}
        for s in group:
            kernel = kernels[part][s.label]
            kmesh, sharding = kernel.placed(mesh) if kernel.sharded else (None, None)
            args = [jax.device_put(x, sharding) if sharding else jnp.asarray(x) for x in arrays]
            compiled = program(kernel.make(kmesh, s.layout, False),
                               mode).lower(*args).compile()
            memory = compiled.memory_analysis()
            fits = (memory.temp_size_in_bytes + memory.output_size_in_bytes) * s.n <= budget
            check_n = 1 if not kernel.sharded else grid.mesh_devices if (
                kernel.accepts is None or kernel.accepts(heads, kv_heads, grid.mesh_devices)
            ) else s.n  # e.g. heads that split over this point's devices but not over all
            check_key = (part, s.label, s.layout, heads, kv_heads, check_n)
            if check_key not in checks:
                checks[check_key] = check(kernel, s.layout, check_n, heads, kv_heads,
                                          grid.check_len, grid.head_dim)
            points[s] = Point(
                part, kernel.impl, s.layout, s.n, heads, kv_heads, seq_len, mode,
                point_flops(kernel, s, grid.head_dim), memory.temp_size_in_bytes, fits,
                local=kernel.local, total_bytes=timing.total_bytes(memory),
                sent_bytes=_sent_bytes(compiled) if kernel.sharded or s.n > 1 else None,
                baseline=baselines.get(part) or "",
                max_rel_error=checks[check_key][0 if mode == "fwd" else 1],
                check_len=grid.check_len)
            if fits:
                timed[s] = (compiled, args)
        for s, (median, low, high) in timing.round_robin(timed, grid.repeats).items():
            points[s].seconds, points[s].seconds_min, points[s].seconds_max = median, low, high
        base = [points[s].seconds for s in group if s.label == baselines.get(part)]
        for p in points.values():
            if base and base[0] is not None and p.seconds is not None:
                p.vs_baseline = base[0] / p.seconds
        rows += points.values()
        del timed
        bar.update(len(group))
        if on_group is not None:
            on_group(rows)
    bar.close()
    return rows
