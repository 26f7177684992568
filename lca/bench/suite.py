"""One benchmark suite: every kernel and layout, forward and forward+backward, side by side.

    python experiments/bench.py [--quick] [--parts single,mesh,linear] [--out DIR]

Parts (dimension legend: T length, n devices on the sequence axis, h/kv
query/key-value heads; batch 1, head_dim 64, float32, causal):

  single  one device: `xla` (`jax.nn.dot_product_attention`, the baseline),
          lca `blockwise`, lca `linear` (chunked, per-head decay), over T.
  mesh    the emulated CPU mesh: lca `ring` in each layout, lca `allgather`
          (zigzag; the baseline), the `ringattention` package's pure-JAX ring
          (K/V repeated for grouped-query heads, which it lacks), and lca
          `linear/allgather`; over T at n = 8, and over n at one T.
  linear  lca `linear` on one device at long T, and the three
          sequence-parallel state exchanges at one long T on the mesh.

Every point is compiled first: its temporary memory comes from the compiled
executable, and a point over the memory budget (a fixed fraction of the
machine's physical memory, so the same points run every time) is recorded as
"does not fit" with its bytes, not run. Points that are compared (same part,
n, heads, T and mode) are timed round-robin in the same rounds; each row has
the median and the min-max spread over the rounds, useful FLOPs, the fraction
of the matmul peak (one device's 2048x2048 float32 matmul, fastest of ten, at
the start and the end of the run; emulated mesh devices share the same cores,
so on a mesh it is the fraction of the machine), and the ratio to its
part's baseline. Beside it: the kernel's max relative error against the
float64 reference, output (fwd) or output and q/k/v gradients (fwd+bwd), on
the same kernel, layout and heads at T = check_len, so a fast wrong kernel
cannot win unnoticed: a row above `records.TOLERANCE` (the tests' float32
tolerance) is marked WRONG in the table and the key figures. The check runs
the same code with tiles scaled to the short sequence (blocks 64 on one
device, 16 on the mesh, linear chunks 16), on the mesh of `mesh_devices`;
rows at other mesh sizes repeat its figure.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

import lca
from lca import layouts
from lca.bench import ring as ring_bench
from lca.bench import timing
from lca.bench.records import Point
from lca.parallel import make_mesh
from lca.parallel.linear import attention_in_layout_linear

AXIS = "sequence"
MODES = ("fwd", "fwd+bwd")
LINEAR_CHUNK = 64
BASELINES = {"single": "xla", "mesh": "allgather", "linear": "linear/allgather"}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A benchmarked kernel: `make(mesh, layout, small)` -> fn(q, k, v) on layout-order arrays.

    mesh is None for a one-device kernel; `small` asks for tiles that fit the
    correctness check's short sequence.
    """
    kind: str                        # "softmax" or "linear": which reference and FLOP count
    make: Callable
    layouts: tuple[str, ...] = ("-",)
    sharded: bool = False
    gqa: bool = True                 # takes kv_heads < heads


def log_decay(heads, dtype=np.float32):
    """The linear kernels' per-head decay: fixed, so every run computes the same thing."""
    return np.asarray(-np.linspace(0.01, 0.1, heads), dtype)


def _softmax(impl, block=512):
    def make(mesh, layout, small):
        b = 64 if small else block
        options = {"block_q": b, "block_k": b} if impl == "blockwise" else {}
        return functools.partial(lca.attention, impl=impl, causal=True, **options)
    return Kernel("softmax", make)


def _linear(mesh, layout, small):
    chunk = 16 if small else LINEAR_CHUNK
    return lambda q, k, v: lca.linear_attention(
        q, k, v, log_decay=jnp.asarray(log_decay(q.shape[2]), q.dtype), chunk_size=chunk)


def _linear_parallel(algorithm):
    def make(mesh, layout, small):
        chunk = 16 if small else LINEAR_CHUNK
        return lambda q, k, v: attention_in_layout_linear(
            q, k, v, mesh=mesh, axis=AXIS, layout=layout, algorithm=algorithm,
            log_decay=jnp.asarray(log_decay(q.shape[2]), q.dtype), chunk_size=chunk)
    return Kernel("linear", make, ("contiguous",), sharded=True, gqa=False)


def _lca_ring(impl, layout_names):
    def make(mesh, layout, small):
        return ring_bench.lca_fn(mesh, AXIS, impl, layout, True, 16 if small else None)
    return Kernel("softmax", make, layout_names, sharded=True)


def _ringattention(mesh, layout, small):
    module = ring_bench.load_ringattention()
    n = mesh.shape[AXIS]

    def fn(q, k, v):
        block = min(16 if small else ring_bench.RINGATTENTION_CHUNK, q.shape[1] // n)
        groups = q.shape[2] // k.shape[2]
        return ring_bench.ringattention_fn(module, mesh, AXIS, True, block, groups)(q, k, v)
    return fn


def default_kernels():
    """{part: {impl: Kernel}}: the registry the suite times; pass another to `run` to add one."""
    kernels = {
        "single": {"xla": _softmax("xla"), "blockwise": _softmax("blockwise"),
                   "linear": Kernel("linear", _linear, gqa=False)},
        "mesh": {"ring": _lca_ring("ring", layouts.LAYOUTS),
                 "allgather": _lca_ring("allgather", ("zigzag",)),
                 "linear/allgather": _linear_parallel("allgather")},
        "linear": {"linear": Kernel("linear", _linear, gqa=False),
                   **{f"linear/{a}": _linear_parallel(a)
                      for a in ("ring", "allgather", "doubling")}},
    }
    if ring_bench.load_ringattention() is not None:
        kernels["mesh"]["ringattention"] = Kernel("softmax", _ringattention, ("contiguous",),
                                                  sharded=True)
    return kernels


@dataclasses.dataclass(frozen=True)
class Grid:
    single_lens: tuple[int, ...]
    heads: tuple[tuple[int, int], ...]   # (heads, kv_heads) pairs
    mesh_lens: tuple[int, ...]           # at n = mesh_devices
    mesh_sizes: tuple[int, ...]          # every n, at mesh_sizes_len, first heads pair
    mesh_sizes_len: int
    linear_lens: tuple[int, ...]         # linear on one device
    linear_parallel_len: int             # sequence-parallel linear, n = mesh_devices
    repeats: int = 3
    mesh_devices: int = 8
    head_dim: int = 64
    check_len: int = 256


QUICK = Grid(single_lens=(512, 1024, 2048), heads=((4, 4), (8, 2)), mesh_lens=(1024, 2048),
             mesh_sizes=(2, 8), mesh_sizes_len=2048, linear_lens=(4096, 16384),
             linear_parallel_len=16384, repeats=2)
DEFAULT = Grid(single_lens=(512, 1024, 2048, 4096, 8192, 16384), heads=((4, 4), (8, 2)),
               mesh_lens=(4096, 8192, 16384), mesh_sizes=(2, 4, 8), mesh_sizes_len=4096,
               linear_lens=(16384, 65536, 262144, 1048576), linear_parallel_len=262144)


@dataclasses.dataclass(frozen=True)
class Spec:
    part: str
    impl: str
    layout: str
    n: int
    heads: int
    kv_heads: int
    seq_len: int
    mode: str


def specs(grid, parts, kernels):
    """Every point of the grid, in the order they run (grouped by part, n, heads, T, mode)."""
    out = []
    for part in parts:
        table = kernels.get(part, {})
        if part == "single":
            where = [(1, t, False) for t in grid.single_lens]
        elif part == "mesh":
            sizes = [(grid.mesh_devices, t) for t in grid.mesh_lens]
            sizes += [(m, grid.mesh_sizes_len) for m in grid.mesh_sizes
                      if (m, grid.mesh_sizes_len) not in sizes]
            where = [(m, t, True) for m, t in sizes]
        else:
            where = [(1, t, False) for t in grid.linear_lens]
            where += [(grid.mesh_devices, grid.linear_parallel_len, True)]
        for (h, kv), (n, t, sharded), mode in itertools.product(grid.heads, where, MODES):
            if part == "mesh" and n != grid.mesh_devices and (h, kv) != grid.heads[0]:
                continue  # the sweep over mesh sizes: first head configuration only
            for impl, kernel in table.items():
                if kernel.sharded != sharded or (h != kv and not kernel.gqa):
                    continue
                out += [Spec(part, impl, lay, n, h, kv, t, mode) for lay in kernel.layouts]
    return out


def point_flops(kernel, spec, head_dim):
    backward = spec.mode != "fwd"
    if kernel.kind == "linear":
        return timing.linear_flops(1, spec.seq_len, spec.heads, head_dim, head_dim,
                                   chunk_size=LINEAR_CHUNK, backward=backward)
    return int(timing.attention_flops(1, spec.seq_len, spec.seq_len, spec.heads, head_dim,
                                      causal=True, backward=backward))


def _program(fn, mode):
    if mode == "fwd":
        return jax.jit(lambda q, k, v, ct: fn(q, k, v))

    def loss(q, k, v, ct):
        return (fn(q, k, v).astype(jnp.float32) * ct).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _inputs(heads, kv_heads, seq_len, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    shape = lambda h: (1, seq_len, h, head_dim)
    return tuple(rng.standard_normal(shape(h)).astype(np.float32)
                 for h in (heads, kv_heads, kv_heads, heads))


def _mesh(n):
    return make_mesh({AXIS: n}, devices=jax.devices()[:n])


# ----------------------------------------------------------------------------- correctness


def relative_error(got, ref):
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


@functools.lru_cache(maxsize=None)
def reference(kind, heads, kv_heads, seq_len, head_dim):
    """(inputs q, k, v, ct as float32 numpy; float64 output and q/k/v gradients)."""
    inputs = _inputs(heads, kv_heads, seq_len, head_dim, seed=1)
    with jax.enable_x64(True):
        q, k, v, ct = (jnp.asarray(x, jnp.float64) for x in inputs)
        if kind == "linear":
            g = jnp.asarray(log_decay(heads, np.float64))
            fn = lambda q, k, v: lca.linear_attention(q, k, v, log_decay=g, impl="quadratic")
        else:
            fn = lambda q, k, v: lca.attention(q, k, v, impl="reference", causal=True)
        out, vjp = jax.vjp(fn, q, k, v)
        results = tuple(np.asarray(x) for x in (out, *vjp(ct)))
    return inputs, results


def check(kernel, layout, n, heads, kv_heads, seq_len, head_dim):
    """(forward error, forward+backward error): max relative error against float64."""
    inputs, ref = reference(kernel.kind, heads, kv_heads, seq_len, head_dim)
    mesh = _mesh(n) if kernel.sharded else None
    fn = kernel.make(mesh, layout, True)
    if layout == "-":
        perm, unperm = jnp.asarray, np.asarray
    else:
        perm = lambda x: jnp.asarray(layouts.permute(x, layout, n))
        unperm = lambda x: layouts.unpermute(np.asarray(x), layout, n)
    q, k, v, ct = (perm(x) for x in inputs)

    @jax.jit
    def outputs_and_grads(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct)

    out, grads = outputs_and_grads(q, k, v, ct)
    fwd = relative_error(unperm(out), ref[0])
    return fwd, max([fwd] + [relative_error(unperm(g), r) for g, r in zip(grads, ref[1:])])


# ----------------------------------------------------------------------------- the run


def _group_key(s):
    return (s.part, s.n, s.heads, s.kv_heads, s.seq_len, s.mode)


def run(grid=DEFAULT, parts=("single", "mesh", "linear"), *, kernels=None, memory_budget=None,
        peak=None, progress=True, on_group=None):
    """Measures every point of `grid` in `parts`; returns (points, matmul peak FLOP/s).

    on_group(points so far, peak): called after every group (to save partial results).

    kernels: {part: {impl: Kernel}}, default `default_kernels()`.
    memory_budget: bytes the temporaries of a point may take on the machine (all
      devices together); default half the physical memory.
    """
    kernels = default_kernels() if kernels is None else kernels
    budget = memory_budget or timing.physical_memory_bytes() // 2
    measure_peak = peak is None
    peak = peak or timing.matmul_peak_flops(fastest=True)
    todo = specs(grid, parts, kernels)
    checks, rows = {}, []
    bar = tqdm(total=len(todo), desc="benchmark suite", unit="point", disable=not progress)
    for key, group in itertools.groupby(todo, key=_group_key):
        group = list(group)
        part, n, heads, kv_heads, seq_len, mode = key
        bar.set_postfix_str(f"{part} n={n} h={heads}/{kv_heads} T={seq_len} {mode}")
        mesh = _mesh(n) if any(kernels[part][s.impl].sharded for s in group) else None
        arrays = _inputs(heads, kv_heads, seq_len, grid.head_dim)
        timed, points = {}, {}
        for s in group:
            kernel = kernels[part][s.impl]
            sharding = NamedSharding(mesh, P(None, AXIS)) if kernel.sharded else None
            args = [jax.device_put(x, sharding) if sharding else jnp.asarray(x) for x in arrays]
            compiled = _program(kernel.make(mesh if kernel.sharded else None, s.layout, False),
                                mode).lower(*args).compile()
            memory = compiled.memory_analysis()
            temp = memory.temp_size_in_bytes
            fits = (temp + memory.output_size_in_bytes) * s.n <= budget
            check_key = (part, s.impl, s.layout, heads, kv_heads)
            if check_key not in checks:
                checks[check_key] = check(kernel, s.layout, grid.mesh_devices if kernel.sharded
                                          else 1, heads, kv_heads, grid.check_len, grid.head_dim)
            err = checks[check_key][0 if mode == "fwd" else 1]
            points[s] = Point(part, s.impl, s.layout, s.n, heads, kv_heads, seq_len, mode,
                              point_flops(kernel, s, grid.head_dim), temp, fits,
                              baseline=BASELINES.get(part, ""), max_rel_error=err,
                              check_len=grid.check_len)
            if fits:
                timed[s] = (compiled, args)
        for s, (median, low, high) in timing.round_robin(timed, grid.repeats).items():
            p = points[s]
            p.seconds, p.seconds_min, p.seconds_max = median, low, high
            p.peak_fraction = p.flops / median / peak
        base = [p.seconds for p in points.values() if p.impl == BASELINES.get(part)]
        for p in points.values():
            if base and base[0] is not None and p.seconds is not None:
                p.vs_baseline = base[0] / p.seconds
        rows += points.values()
        del timed
        bar.update(len(group))
        if on_group is not None:
            on_group(rows, peak)
    bar.close()
    if measure_peak:  # measured at both ends of the run, the faster one counts
        peak = max(peak, timing.matmul_peak_flops(fastest=True))
        for p in rows:
            p.peak_fraction = None if p.seconds is None else p.flops / p.seconds / peak
    return rows, peak
