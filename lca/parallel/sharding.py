"""Logical axis names -> mesh axes, for parameters and activations.

Model code names only logical axes (`batch`, `length`, `embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `vocab`). A rule set is data: a tuple of
`(logical, physical)` pairs where physical is a mesh axis name, a tuple of
them, or None (replicated). Parameters and activations have separate rule sets
(e.g. `embed` -> `fsdp` for weights, `length` -> `sequence` for activations).

Mesh axes a rule names but the mesh lacks are dropped, so one rule set serves
a (data, sequence) mesh, a (data, fsdp, sequence, tensor) mesh and no mesh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab")
# `sequence` is the ring (the layout's axis); `ulysses` the all-to-all axis a two-axis
# strategy (usp) shards the sequence over too, ring-major: ("length", ("sequence", "ulysses")).
MESH_AXES = ("data", "fsdp", "sequence", "ulysses", "tensor")

Rules = tuple  # ((logical, physical | tuple[physical, ...] | None), ...)

# What `lca.sequence_parallel_attention` shards by when given no rules: batch
# over data and fsdp, the sequence over `sequence`, heads over `tensor`.
DEFAULT_ACTIVATION_RULES = (("batch", ("data", "fsdp")), ("length", "sequence"),
                            ("heads", "tensor"), ("kv_heads", "tensor"))


def check_rules(name: str, rules: Rules) -> Rules:
    """Validates a rule set and returns it as a tuple of (logical, tuple-of-axes) pairs."""
    out = []
    for pair in rules:
        if len(pair) != 2:
            raise ValueError(f"{name}: each rule is (logical, physical); got {pair!r}")
        logical, physical = pair
        if logical not in LOGICAL_AXES:
            raise ValueError(f"{name}: unknown logical axis {logical!r}; known: {LOGICAL_AXES}")
        axes = () if physical is None else (physical,) if isinstance(physical, str) else tuple(physical)
        for axis in axes:
            if axis not in MESH_AXES:
                raise ValueError(
                    f"{name}: logical axis {logical!r} maps to unknown mesh axis {axis!r};"
                    f" known mesh axes: {MESH_AXES}")
        out.append((logical, axes))
    return tuple(out)


def spec_for(logical: Sequence[str | None], rules: Rules, mesh: Mesh | None,
             shape: Sequence[int] | None = None) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have these logical names.

    Mesh axes missing from `mesh` (or already used by an earlier dimension)
    are dropped. With `shape`, an axis that does not divide its dimension is
    dropped too (used for activations such as a batch of one).
    """
    return _spec(logical, dict(check_rules("rules", rules)), mesh, shape)


def _spec(logical, table, mesh, shape):
    present = dict(mesh.shape) if mesh is not None else {}
    used, parts = set(), []
    for i, name in enumerate(logical):
        axes = [a for a in table.get(name, ()) if a in present and a not in used]
        if shape is not None:
            kept, size = [], 1
            for a in axes:
                if shape[i] % (size * present[a]) == 0:
                    kept.append(a)
                    size *= present[a]
            axes = kept
        used.update(axes)
        parts.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*parts)


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    """What a model needs to place its activations: a mesh (or None) and the rules.

    `sequence_axis` is the ring axis, the one the token layout is over; the
    activation rules may shard `length` over a second axis after it (the
    all-to-all axis of a two-axis strategy): `sequence_axes`.
    """

    mesh: Mesh | None = None
    activation_rules: Rules = ()
    sequence_axis: str = "sequence"

    @property
    def sequence_shards(self) -> int:
        """Shards of the layout (the ring axis)."""
        if self.mesh is None:
            return 1
        return dict(self.mesh.shape).get(self.sequence_axis, 1)

    @property
    def sequence_axes(self) -> tuple[str, ...]:
        """The mesh axes `length` is sharded over, ring first (those of size > 1)."""
        if self.mesh is None:
            return ()
        shape = dict(self.mesh.shape)
        rule = dict(check_rules("rules", self.activation_rules)).get("length", ())
        axes = [self.sequence_axis] + [a for a in rule if a != self.sequence_axis]
        return tuple(a for a in axes if shape.get(a, 1) > 1)

    @property
    def total_sequence_shards(self) -> int:
        return math.prod(dict(self.mesh.shape)[a] for a in self.sequence_axes) if self.mesh \
            else 1

    def strategy_axis(self, name: str, axes: int):
        """The `axis` argument for a strategy that takes `axes` mesh axes (1, 2, or 0 for
        either): the ring axis, or (all-to-all axis, ring axis)."""
        found = self.sequence_axes
        if axes == 2 and len(found) != 2 or axes == 1 and len(found) > 1:
            want = ("the sequence over two mesh axes: config.mesh.ulysses and sequence > 1,"
                    " with the activation rule length -> (sequence, ulysses)" if axes == 2
                    else "the sequence over one mesh axis")
            raise ValueError(f"attention kernel {name!r} takes {want}; this mesh and the rules"
                             f" shard it over {found or 'no axis'}")
        return found[0] if len(found) < 2 else (found[1], found[0])


def activation_spec(logical: Sequence[str | None], rules: Rules, mesh: Mesh, shape,
                    sequence_axis: str | None = None) -> PartitionSpec:
    """The PartitionSpec of an activation: what `constrain` applies and what a
    kernel's `shard_map` takes, from the same rules. `sequence_axis` (when
    given) is the mesh axis, or ring-major tuple of axes, `length` maps to, whatever
    the rules say (any axis name of the mesh)."""
    table = dict(check_rules("rules", rules))
    if sequence_axis is not None:
        table["length"] = (sequence_axis,) if isinstance(sequence_axis, str) else tuple(
            sequence_axis)
    return _spec(logical, table, mesh, shape)


def constrain(x, logical: Sequence[str | None], ctx: ShardingContext | None):
    """`with_sharding_constraint` by logical names; does nothing without a mesh."""
    if ctx is None or ctx.mesh is None:
        return x
    spec = activation_spec(logical, ctx.activation_rules, ctx.mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def _logical_names(variable):
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else (None,) * len(variable.shape)


def param_specs(state, rules: Rules, mesh: Mesh | None):
    """The State with each Variable's value replaced by its PartitionSpec.

    Variables carry their logical axis names as `sharding` metadata.
    Raises a ValueError naming the parameter when a mesh axis does not divide
    the dimension it shards.
    """
    from flax import nnx  # only the sharding of Variables needs Flax

    present = dict(mesh.shape) if mesh is not None else {}

    def one(path, v):
        if not isinstance(v, nnx.Variable):
            return PartitionSpec()
        names = _logical_names(v)
        spec = spec_for(names, rules, mesh)
        for dim, part in zip(v.shape, spec):
            axes = () if part is None else (part,) if isinstance(part, str) else part
            size = math.prod(present[a] for a in axes)
            if dim % size:
                key = "/".join(str(getattr(p, "key", p)) for p in path)
                raise ValueError(
                    f"parameter {key} of shape {tuple(v.shape)} (logical {names}) cannot be"
                    f" sharded as {spec}: {dim} does not divide by mesh axes {axes} of size"
                    f" {size}; change the model size or the rule in config.sharding.params")
        return v.replace(spec)

    return jax.tree_util.tree_map_with_path(
        one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state, rules: Rules, mesh: Mesh):
    """NamedShardings for an nnx State (see `param_specs`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, rules, mesh))
