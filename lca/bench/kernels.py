"""What the benchmark suite measures: the registry's kernels, and the peer it is measured against.

`default_kernels()` reads `lca.kernels.registry`: every local kernel flagged
`bench` on one device; every strategy over every such local kernel that runs
under one, in the strategy's `bench_layouts`, on the mesh; the linear family
on one device and with each state exchange across the mesh. A kernel
registered there is measured with nothing added here.

The peer is the `ringattention` package's pure-JAX ring (0.1.2; its package
`__init__` fails on current JAX, so its module file is loaded on its own),
given K/V repeated for grouped-query heads, which it lacks.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lca
from lca.kernels import registry
from lca.parallel import make_mesh
from lca.parallel.linear import attention_in_layout_linear
from lca.parallel.sequence import attention_in_layout

AXIS = "sequence"
LINEAR_CHUNK = 64
PEER = "ringattention"
PEER_CHUNK = 512  # its query/key chunk length
PEER_MISSING = ("the `ringattention` package (0.1.2) is not installed, so its ring is not timed;"
                " install it with: pip install -e '.[bench]'")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A benchmarked kernel: `make(mesh, layout, small)` -> fn(q, k, v) on layout-order arrays.

    mesh is None for a one-device kernel; `small` asks for tiles that fit the
    correctness check's short sequence.
    """

    kind: str                        # "softmax" or "linear": which reference and FLOP count
    make: Callable
    impl: str                        # the row's impl
    local: str = ""                  # the local kernel a strategy runs
    layouts: tuple[str, ...] = ("-",)
    sharded: bool = False
    gqa: bool = True                 # measured with grouped-query heads too
    accepts: Callable | None = None  # (heads, kv_heads, n) -> whether it runs there
    place: Callable | None = None    # 1-D mesh -> (its mesh, the inputs' NamedSharding)
    ring_share: int = 1              # the layout is over n / ring_share shards (the ring's)

    def placed(self, mesh):
        """(the mesh this kernel runs on, the sharding its sequence-sharded inputs take)."""
        if self.place is not None:
            return self.place(mesh)
        return mesh, NamedSharding(mesh, P(None, AXIS))


def log_decay(heads, dtype=np.float32):
    """The linear kernels' per-head decay: fixed, so every run computes the same thing."""
    return np.asarray(-np.linspace(0.01, 0.1, heads), dtype)


def _one_device(name):
    tiled = registry.local_kernel(name).tiles is not None

    def make(mesh, layout, small):
        tiles = {"block_q": 64, "block_k": 64} if small and tiled else {}
        return functools.partial(lca.attention, impl=name, causal=True, **tiles)
    return Kernel("softmax", make, name)


A2A = 2  # a two-axis strategy's all-to-all degree on the benchmark mesh


def _two_axes(mesh):
    """(ulysses 2, sequence n / 2) on the 1-D mesh's devices, and the inputs' sharding on it:
    the sequence over both axes, ring-major."""
    two = make_mesh({"ulysses": A2A, "sequence": mesh.size // A2A}, devices=list(mesh.devices.flat))
    return two, NamedSharding(two, P(None, (AXIS, "ulysses")))


def _strategy(strategy, local):
    def make(mesh, layout, small):
        tiles = {"block_q": 16, "block_k": 16} if small else {}
        axis = AXIS
        if strategy.axes == 2:
            mesh, axis = _two_axes(mesh)[0], ("ulysses", AXIS)
        return functools.partial(attention_in_layout, mesh=mesh, axis=axis, impl=strategy.name,
                                 local=local, layout=layout, causal=True, **tiles)

    def accepts(heads, kv_heads, n):
        if strategy.axes == 2 and (n % A2A or n == A2A):
            return False
        return strategy.takes(heads, kv_heads, (("ulysses", A2A),) if strategy.axes == 2
                              else ((AXIS, n),))  # the check made before tracing

    return Kernel("softmax", make, strategy.name, local, strategy.bench_layouts, sharded=True,
                  accepts=accepts, place=_two_axes if strategy.axes == 2 else None,
                  ring_share=A2A if strategy.axes == 2 else 1)


def _linear(name, algorithm=None):
    def make(mesh, layout, small):
        chunk = 16 if small else LINEAR_CHUNK
        decay = lambda q: jnp.asarray(log_decay(q.shape[2]), q.dtype)
        if algorithm is None:
            return lambda q, k, v: lca.linear_attention(q, k, v, log_decay=decay(q),
                                                        chunk_size=chunk)
        return lambda q, k, v: attention_in_layout_linear(
            q, k, v, mesh=mesh, axis=AXIS, layout=layout, algorithm=algorithm,
            log_decay=decay(q), chunk_size=chunk)
    impl = name if algorithm is None else f"{name}/{algorithm}"
    # At heads == kv_heads only: its grid is long enough already (the kernel takes both).
    return Kernel("linear", make, impl, layouts=("-",) if algorithm is None else ("contiguous",),
                  sharded=algorithm is not None, gqa=False)


def default_kernels():
    """{part: {label: Kernel}} from the registry: what the suite times by default."""
    benched = [e.name for e in registry.entries("local") if e.bench]
    sharding = [n for n in benched if registry.local_kernel(n).shards]
    single = {n: _one_device(n) for n in benched}
    mesh, linear = {}, {}
    for s in registry.entries("strategy"):
        for local in sharding:
            label = s.name if local == registry.DEFAULT_LOCAL else f"{s.name}[{local}]"
            mesh[label] = _strategy(s, local)
    for family in registry.entries("linear"):
        single[family.name] = linear[family.name] = _linear(family.name)
        default = f"{family.name}/{family.default_algorithm}"
        mesh[default] = _linear(family.name, family.default_algorithm)
        linear.update({f"{family.name}/{a}": _linear(family.name, a) for a in family.algorithms})
    if load_peer() is not None:
        mesh[PEER] = Kernel("softmax", _peer, PEER, layouts=("contiguous",), sharded=True)
    return {"single": single, "mesh": mesh, "linear": linear}


def baselines():
    """{part: the label its rows are compared with}."""
    family = registry.entries("linear")[0]
    return {"single": registry.baseline("local"), "mesh": registry.baseline("strategy"),
            "linear": f"{family.name}/{family.default_algorithm}"}


@functools.lru_cache(maxsize=1)
def load_peer():
    """The `ringattention` package's ringattention_jax module, or None when not installed."""
    try:
        from importlib import metadata
        path = metadata.distribution("ringattention").locate_file(
            "ringattention/ringattention_jax.py")
    except metadata.PackageNotFoundError:
        return None
    spec = importlib.util.spec_from_file_location("ringattention_jax", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peer(mesh, layout, small):
    """Natural-order (q, k, v) -> out through the package's ring; K/V repeated for GQA."""
    module, n = load_peer(), mesh.shape[AXIS]

    def fn(q, k, v):
        block = min(16 if small else PEER_CHUNK, q.shape[1] // n)
        options = dict(causal_block_size=1, query_chunk_size=block, key_chunk_size=block,
                       deterministic=True, dropout_rng=None, attn_pdrop=0.0, dtype=jnp.float32,
                       policy=jax.checkpoint_policies.nothing_saveable, precision=None,
                       prevent_cse=True)
        per_shard = lambda q, k, v: module.ring_attention(q, k, v, None, None, None, AXIS, True,
                                                           options)
        groups = q.shape[2] // k.shape[2]
        if groups > 1:  # no grouped-query heads: K/V repeated in memory, on the wire
            k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        spec = P(None, AXIS)
        return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                             check_vma=False)(q, k, v)
    return fn
