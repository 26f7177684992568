"""The one table of attention kernels: every local kernel, strategy and linear family.

    from lca.kernels import registry
    registry.names("local")       # ['blockwise', 'reference', 'xla']
    registry.register(my_kernel)  # a LocalKernel, Strategy or LinearFamily

Four kinds of entry:

  local     `local.LocalKernel`: what runs on the tokens one device holds
            (forward / backward of the local-kernel protocol), with what it
            supports and its default tiles. `lca.attention(impl=NAME)` runs
            one on one device; every strategy runs any of them.
  strategy  `Strategy`: how a sequence sharded on a mesh axis is distributed
            (ring, all-gather); its `shard_fn` runs inside `jax.shard_map`
            with a local kernel it is handed.
  linear    `LinearFamily`: causal linear attention, its own family (a state,
            not a softmax, crosses shards), with its state-exchange algorithms.
  sparse    `SparseKernel`: causal attention under a sparsity the layer decides
            from its own q and k (hash buckets, dropped tokens, HyperAttention's
            sampling; `lca.sparse`, `lca.models.sparse`), on one sequence shard.

Everything that lists kernels reads this table: `lca.attention`,
`lca.sequence_parallel_attention`, the model's adapters and config checks,
the config variants, the benchmark suite, the training benchmark and the cost
model. Adding a kernel is one file and one `register` call
(docs/adding_a_kernel.md).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from lca.layouts import LAYOUTS
from lca.kernels import (allgather, blockwise, linear_parallel, pallas_gpu, platform, reference,
                         ring, splash, ulysses, xla)
from lca.kernels.local import LocalKernel
from lca.kernels.masks import MaskSpec

DEFAULT_LOCAL = "blockwise"
DEFAULT_STRATEGY = "ring"


def auto_local() -> str:
    """The local kernel "auto" names here: the one written for the platform kernels are
    built for (splash on TPU, pallas_gpu on GPU), else DEFAULT_LOCAL (blockwise on CPU)."""
    return next((e.name for e in entries("local") if e.platform == platform.current()),
                DEFAULT_LOCAL)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A way to distribute a sequence over one mesh axis, over any local kernel.

    shard_fn(q, k, v, *, axis_name, local, causal, window, segment_ids,
    positions, scale, block_q, block_k, **layout_options) runs inside
    `jax.shard_map` on one shard in layout order (see `ring.ring_attention`);
    axis_name is one mesh axis, or with `axes=2` a pair (all-to-all axis, ring
    axis), the sequence sharded over both, ring-major.
    layout_options(layout, causal, window, shard_len, n, stripe) -> extra
    keyword arguments for a layout (the ring's fewer steps for a contiguous
    window), n and shard_len those of the layout's (ring) axis.
    check(q_shape, k_shape, axes) raises a ValueError for shapes the strategy
    cannot split over its axes ((name, size) pairs), before anything is traced.
    local_heads(q_shape, k_shape, axes) -> (heads, kv_heads) the local kernel
    sees, where the strategy moves heads (an all-to-all); default tiles follow
    that grouping.
    communication: its pattern, as `tools/cost_model.py` models it ("ring":
    K/V hop around a ring; "allgather": K/V gathered, dK/dV reduce-scattered;
    "alltoall": heads for sequence and back; "alltoall+ring").
    bench_layouts: the layouts the benchmark suite measures it in.
    view: the `local.Placement` view of the tokens its local kernel sees ("shards",
    "gathered", "whole"; over the layout's axis), passed as `placement=`.
    baseline: the mesh baseline of the benchmark suite.
    """

    name: str
    shard_fn: Callable
    doc: str
    communication: str
    layouts: tuple[str, ...] = LAYOUTS
    bench_layouts: tuple[str, ...] = LAYOUTS
    layout_options: Callable | None = None
    check: Callable | None = None
    local_heads: Callable | None = None
    axes: int = 1
    view: str | None = None
    baseline: bool = False

    kind = "strategy"

    def takes(self, heads: int, kv_heads: int, axes) -> bool:
        """Whether `check` accepts these heads over `axes` ((name, size) pairs)."""
        try:
            self.check and self.check((1, 1, heads, 1), (1, 1, kv_heads, 1), tuple(axes))
        except ValueError:
            return False
        return True


@dataclasses.dataclass(frozen=True)
class LinearFamily:
    """Causal linear attention: one device (`lca.linear_attention`) or across a mesh axis
    (`lca.parallel.linear`), the state crossing shards by one of `algorithms`."""

    name: str
    doc: str
    layouts: tuple[str, ...]
    algorithms: tuple[str, ...]
    default_algorithm: str

    kind = "linear"


@dataclasses.dataclass(frozen=True)
class SparseKernel:
    """A sparse or approximate causal kernel of `lca.sparse` a model layer can name; its
    options are `config.model.sparse` and `lca.models.sparse` runs it. exact: it computes
    exact attention under its (sparser) mask; False for an approximation."""

    name: str
    doc: str
    exact: bool = True

    kind = "sparse"


KINDS = ("local", "strategy", "linear", "sparse")
_TABLE: dict[str, LocalKernel | Strategy | LinearFamily] = {}


def register(entry):
    """Adds an entry; a name already in the table raises a ValueError."""
    if getattr(entry, "kind", None) not in KINDS:
        raise ValueError(f"registry entries are LocalKernel, Strategy, LinearFamily or"
                         f" SparseKernel; got {type(entry).__name__}")
    if entry.name in _TABLE:
        raise ValueError(f"attention kernel {entry.name!r} is already registered"
                         f" (as a {_TABLE[entry.name].kind} entry); choose another name")
    _TABLE[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Removes an entry (tests that register their own kernels clean up with it)."""
    _TABLE.pop(name)


def names(kind: str | None = None) -> list[str]:
    """Registered names, of one kind or all, in registration order."""
    return [n for n, e in _TABLE.items() if kind is None or e.kind == kind]


def entries(kind: str | None = None) -> list:
    return [_TABLE[n] for n in names(kind)]


def get(name: str, kinds=KINDS, what: str = "attention kernel", where: str = ""):
    """The entry called `name`, of one of `kinds`; a ValueError lists those that exist
    ("unknown {what} {name!r}{where}; known: [...]")."""
    entry = _TABLE.get(name) if isinstance(name, str) else None
    if entry is None or entry.kind not in kinds:
        known = [n for n in names() if _TABLE[n].kind in kinds]
        raise ValueError(f"unknown {what} {name!r}{where}; known: {known}")
    return entry


def baseline(kind: str) -> str | None:
    """The name of the benchmark baseline of a kind, if one is flagged."""
    return next((e.name for e in entries(kind) if getattr(e, "baseline", False)), None)


def local_kernel(local=None, *, q=None, k=None, spec: MaskSpec | None = None,
                 strategy: str | None = None) -> LocalKernel:
    """The local kernel `local` names (None: DEFAULT_LOCAL; "auto": `auto_local()`), checked
    against a call.

    With q, k (arrays or shape/dtype structs) and the mask spec, a kernel that
    does not support them raises a ValueError naming the kernel, what it got
    and the local kernels that would work; `strategy` asks for one that can
    run under that strategy.
    """
    if local == "auto":
        local = auto_local()
    kernel = local if isinstance(local, LocalKernel) else get(
        DEFAULT_LOCAL if local is None else local, ("local",), "local kernel")
    if q is None:
        return kernel
    problem = kernel.unsupported(q, k, spec, strategy=strategy)
    if problem is not None:
        works = [e.name for e in entries("local")
                 if e.unsupported(q, k, spec, strategy=strategy) is None]
        where = f" under strategy {strategy!r}" if strategy else ""
        raise ValueError(f"local kernel {kernel.name!r} does not support {problem}{where};"
                         f" local kernels that would work: {works}")
    return kernel


for _entry in (
        blockwise.KERNEL, reference.KERNEL, xla.KERNEL, splash.KERNEL, pallas_gpu.KERNEL,
        Strategy("ring", ring.ring_attention, layout_options=ring.layout_options,
                 communication="ring", view="shards",
                 doc="K/V shards walk the ring; transfers overlap compute; masked pairs skipped"),
        Strategy("allgather", allgather.allgather_attention, bench_layouts=("zigzag",),
                 communication="allgather", baseline=True, view="gathered",
                 doc="one all-gather of K/V, then the local kernel"),
        Strategy("ulysses", ulysses.ulysses_attention, layout_options=ulysses.layout_options,
                 check=ulysses.check_shapes, local_heads=ulysses.local_heads,
                 communication="alltoall", bench_layouts=("zigzag",), view="whole",
                 doc="all-to-all: the whole sequence of H/n heads on each device"),
        Strategy("usp", ulysses.usp_attention, layout_options=ring.layout_options,
                 check=ulysses.check_shapes, local_heads=ulysses.local_heads,
                 communication="alltoall+ring", axes=2, view="shards",
                 bench_layouts=("zigzag",),
                 doc="all-to-all over the first axis, the ring over the second"),
        LinearFamily("linear", doc="chunked causal linear attention; states cross shards",
                     layouts=linear_parallel.LAYOUTS, algorithms=linear_parallel.ALGORITHMS,
                     default_algorithm="allgather"),
        SparseKernel("hash_sparse", doc="causal attention within angular-LSH buckets of q and k"),
        SparseKernel("qk_drop", doc="causal attention among the queries and keys kept"),
        SparseKernel("hyper", exact=False,
                     doc="HyperAttention: sorted-LSH block diagonal + sampled columns")):
    register(_entry)
