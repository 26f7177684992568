"""ml_collections config -> frozen dataclasses, validated before anything compiles.

This is where `ml_collections` stops: everything below `lca.train` sees the
dataclasses. `Experiment.to_dict()` is what a checkpoint stores and
`Experiment.from_dict()` reads it back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from lca import layouts
from lca.kernels import registry
from lca.kernels.masks import MaskSpec
from lca.models.config import FEATURE_MAPS, LinearOptions, ModelConfig, SparseOptions
from lca.parallel.mesh import check_dcn, resolve_sizes
from lca.parallel.sequence import check_length
from lca.parallel.sharding import MESH_AXES, check_rules

TASKS = ("passkey", "recall", "text")
ON_NONFINITE = ("stop", "skip")
SECTIONS = ("model", "data", "train", "eval", "mesh", "dcn", "sharding", "seed", "cpu_devices")
MAX_LEARNING_RATE = 1.0  # AdamW steps are about lr per parameter; above 1 is a typo


@dataclasses.dataclass(frozen=True)
class DataConfig:
    task: str = "passkey"
    seq_len: int = 512
    vocab_size: int = 64
    key_len: int = 4              # passkey
    num_pairs: int = 16           # recall
    num_queries: int = 8          # recall
    validation_percent: int = 5   # text
    max_bytes: int = 0            # text; 0 = whole split
    curriculum: tuple = ()        # ((seq_len, steps), ...) before seq_len; see lca.data.Batches


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    end_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 0           # 0 = only at the end
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    on_nonfinite: str = "stop"    # a non-finite loss/gradient: "stop" the run, or "skip" the update


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 8
    batches: int = 2
    lengths: tuple[int, ...] = ()  # retrieval: lengths to score; () = the training length
    depth_bins: int = 10


@dataclasses.dataclass(frozen=True)
class Experiment:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    mesh: tuple[tuple[str, int], ...] = (("data", -1),)
    dcn: tuple[tuple[str, int], ...] = ()   # axes split over slices: (axis, slices)
    param_rules: tuple = ()
    activation_rules: tuple = ()
    seed: int = 0
    cpu_devices: int = 0

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "Experiment":
        m = dict(d["model"])
        m["linear"] = LinearOptions(**m["linear"])
        m["sparse"] = SparseOptions(**m.get("sparse", {}))  # runs saved before it existed
        m["attention"] = tuple(m["attention"])
        ev = dict(d["eval"], lengths=tuple(d["eval"]["lengths"]))
        data = dict(d["data"], curriculum=tuple(tuple(x) for x in d["data"]["curriculum"]))
        return cls(model=ModelConfig(**m), data=DataConfig(**data),
                   train=TrainConfig(**d["train"]), eval=EvalConfig(**ev),
                   mesh=tuple((str(a), int(s)) for a, s in d["mesh"]),
                   dcn=tuple((str(a), int(s)) for a, s in d.get("dcn", ())),
                   param_rules=_rules(d["param_rules"]),
                   activation_rules=_rules(d["activation_rules"]),
                   seed=int(d["seed"]), cpu_devices=int(d["cpu_devices"]))

    def mesh_sizes(self, num_devices: int) -> dict:
        """The mesh with -1 resolved (`lca.parallel.mesh.resolve_sizes`, naming config.mesh)."""
        return resolve_sizes(dict(self.mesh), num_devices, "config.mesh")


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _rules(pairs) -> tuple:
    out = []
    for logical, physical in pairs:
        if isinstance(physical, (list, tuple)):
            physical = tuple(physical)
        out.append((logical, physical))
    return tuple(out)


def _fields(cls, section: Any, name: str) -> dict:
    d = dict(section)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"config.{name} has unknown option(s) {unknown}; known: {sorted(known)}")
    return d


def _data(section) -> DataConfig:
    d = _fields(DataConfig, section, "data")
    d["curriculum"] = tuple((int(n), int(s)) for n, s in d.get("curriculum", ()))
    return DataConfig(**d)


def from_config(config) -> Experiment:
    """Builds and validates an `Experiment` from a ConfigDict (or nested dict)."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = sorted(set(c) - set(SECTIONS))
    if unknown:
        raise ValueError(f"config has unknown option(s) {unknown}; known: {sorted(SECTIONS)}")
    unknown = sorted(set(c.get("sharding", {})) - {"params", "activations"})
    if unknown:
        raise ValueError(f"config.sharding has unknown option(s) {unknown};"
                         " known: ['activations', 'params']")
    if "model" not in c:
        raise ValueError("config.model is missing; see configs/passkey.py for the options")
    model = _fields(ModelConfig, c["model"], "model")
    model["linear"] = LinearOptions(**_fields(LinearOptions, model.get("linear", {}),
                                              "model.linear"))
    model["sparse"] = SparseOptions(**_fields(SparseOptions, model.get("sparse", {}),
                                              "model.sparse"))
    attention = model.get("attention", registry.DEFAULT_LOCAL)
    if isinstance(attention, str):
        attention = [a.strip() for a in attention.split(",") if a.strip()]
    # "auto" is resolved once, here, so the run records the kernel it ran.
    model["attention"] = tuple(registry.auto_local() if a == "auto" else a for a in attention)
    if model.get("local") == "auto":
        model["local"] = registry.auto_local()
    ev = _fields(EvalConfig, c.get("eval", {}), "eval")
    ev["lengths"] = tuple(int(x) for x in ev.get("lengths", ()))
    mesh = c.get("mesh", {"data": -1})
    exp = Experiment(
        model=ModelConfig(**model),
        data=_data(c.get("data", {})),
        train=TrainConfig(**_fields(TrainConfig, c.get("train", {}), "train")),
        eval=EvalConfig(**ev),
        mesh=tuple((str(a), int(s)) for a, s in dict(mesh).items()),
        dcn=tuple((str(a), int(s)) for a, s in dict(c.get("dcn") or {}).items()),
        param_rules=_rules(c.get("sharding", {}).get("params", ())),
        activation_rules=_rules(c.get("sharding", {}).get("activations", ())),
        seed=int(c.get("seed", 0)), cpu_devices=int(c.get("cpu_devices", 0)))
    validate(exp)
    return exp


def validate(exp: Experiment, num_devices: int | None = None) -> None:
    """Raises a ValueError naming the option; with `num_devices`, checks the mesh too."""
    m, d, t = exp.model, exp.data, exp.train
    if m.layout not in layouts.LAYOUTS:
        raise ValueError(f"config.model.layout {m.layout!r} is unknown; known: {layouts.LAYOUTS}")
    if m.linear.feature_map not in FEATURE_MAPS:
        raise ValueError(f"config.model.linear.feature_map {m.linear.feature_map!r} is unknown;"
                         f" known: {FEATURE_MAPS}")
    sp = m.sparse
    for name, ok, want in (("num_buckets", sp.num_buckets >= 1, "an integer >= 1"),
                           ("keep", 0 < sp.keep <= 1, "in (0, 1]"),
                           ("capacity_factor", sp.capacity_factor > 0, "> 0"),
                           ("block", sp.block >= 1, "an integer >= 1"),
                           ("sample_size", sp.sample_size >= 1, "an integer >= 1"),
                           ("min_seq_len", sp.min_seq_len >= 0, "an integer >= 0")):
        if not ok:
            raise ValueError(f"config.model.sparse.{name} is {getattr(sp, name)!r}; it must be"
                             f" {want}")
    if m.heads % m.kv_heads:
        raise ValueError(f"config.model.heads ({m.heads}) must be a multiple of"
                         f" config.model.kv_heads ({m.kv_heads})")
    if m.head_dim % 2:
        raise ValueError(f"config.model.head_dim ({m.head_dim}) must be even for RoPE")
    if d.task not in TASKS:
        raise ValueError(f"config.data.task {d.task!r} is unknown; known: {TASKS}")
    for axis, size in exp.mesh:
        if axis not in MESH_AXES:
            raise ValueError(f"config.mesh names unknown axis {axis!r}; known: {MESH_AXES}")
    for axis, slices in exp.dcn:
        if axis not in dict(exp.mesh):
            raise ValueError(f"config.dcn names axis {axis!r}, which is not in config.mesh"
                             f" {dict(exp.mesh)}")
        if slices < 1:
            raise ValueError(f"config.dcn[{axis!r}] is {slices}; it must be >= 1 slices")
    check_rules("config.sharding.params", exp.param_rules)
    check_rules("config.sharding.activations", exp.activation_rules)
    _check_ranges(exp)
    _check_kernels(exp)
    if num_devices is None:
        return
    sizes = exp.mesh_sizes(num_devices)
    check_dcn(dict(exp.dcn), sizes, "config.dcn")
    batch_axes = math.prod(sizes.get(a, 1) for a in _axes_of(exp.activation_rules, "batch"))
    for name, batch in (("config.train.batch_size", t.batch_size),
                        ("config.eval.batch_size", exp.eval.batch_size)):
        if batch % batch_axes:
            raise ValueError(f"{name} ({batch}) must be a multiple of the batch mesh axes"
                             f" ({batch_axes} devices: {_axes_of(exp.activation_rules, 'batch')})")
    shards = sizes.get("sequence", 1)
    seq_axes = [a for a in dict.fromkeys(("sequence",) + _axes_of(exp.activation_rules,
                                                                 "length"))
                if sizes.get(a, 1) > 1]
    total = math.prod(sizes[a] for a in seq_axes)
    for length in (d.seq_len,) + exp.eval.lengths + tuple(n for n, _ in d.curriculum):
        try:
            check_length(length, m.layout, shards, total)
        except ValueError as e:
            raise ValueError(
                f"config.data.seq_len / curriculum / config.eval.lengths: {e}") from None
    for axis in ("heads", "kv_heads"):
        n = math.prod(sizes.get(a, 1) for a in _axes_of(exp.activation_rules, axis))
        if getattr(m, axis) % n:
            raise ValueError(f"config.model.{axis} ({getattr(m, axis)}) must be a multiple of"
                             f" the mesh axes it is sharded over ({n} devices)")
    _check_strategy_axes(exp, sizes, seq_axes)


def _check_strategy_axes(exp: Experiment, sizes: dict, seq_axes: list) -> None:
    """Each strategy gets the sequence axes it takes, and its heads split over them."""
    m = exp.model
    tensor = math.prod(sizes.get(a, 1) for a in _axes_of(exp.activation_rules, "heads"))
    for name in dict.fromkeys(m.attention):
        entry = registry.get(name)
        if entry.kind != "strategy" or not seq_axes:
            continue
        if entry.axes == 2 and len(seq_axes) != 2 or entry.axes == 1 and len(seq_axes) > 1:
            want = ("two mesh axes (config.mesh.ulysses and config.mesh.sequence > 1, and the"
                    " rule length -> ('sequence', 'ulysses'))" if entry.axes == 2
                    else "one mesh axis")
            raise ValueError(f"config.model.attention={name!r} shards the sequence over {want};"
                             f" config.mesh {sizes} and config.sharding.activations shard it"
                             f" over {seq_axes}")
        if entry.check is not None:
            axes = seq_axes if entry.axes == 1 else seq_axes[::-1]
            try:
                entry.check((1, 1, m.heads // tensor, m.head_dim),
                            (1, 1, max(m.kv_heads // tensor, 1), m.head_dim),
                            tuple((a, sizes[a]) for a in axes))
            except ValueError as e:
                raise ValueError(f"config.model.attention={name!r} on config.mesh {sizes}:"
                                 f" {e}") from None


def _check_kernels(exp: Experiment) -> None:
    """Every kernel the model names exists in the registry and supports what the model asks:
    a causal mask, the window, segment ids for packed text, the dtype, grouped-query heads."""
    m = exp.model
    for kernel in m.attention:
        if kernel not in registry.names():
            raise ValueError(f"config.model.attention names unknown kernel {kernel!r};"
                             f" known: {registry.names()}")
    if m.local not in registry.names("local"):
        raise ValueError(f"config.model.local names unknown local kernel {m.local!r};"
                         f" known: {registry.names('local')}")
    kinds = {registry.get(k).kind for k in m.attention}
    q = jax.ShapeDtypeStruct((1, exp.data.seq_len, m.heads, m.head_dim), np.dtype(m.dtype))
    k = jax.ShapeDtypeStruct((1, exp.data.seq_len, m.kv_heads, m.head_dim), np.dtype(m.dtype))
    spec = MaskSpec(True, m.window or None, exp.data.task == "text")
    checks = [(f"config.model.attention={k!r}", k, None) for k in m.attention
              if registry.get(k).kind == "local"]
    if "strategy" in kinds:
        strategy = next(k for k in m.attention if registry.get(k).kind == "strategy")
        checks.append((f"config.model.local={m.local!r}", m.local, strategy))
    for option, name, strategy in checks:
        try:
            registry.local_kernel(name, q=q, k=k, spec=spec, strategy=strategy)
        except ValueError as e:
            raise ValueError(f"{option}: {e}") from None


def _check_ranges(exp: Experiment) -> None:
    """Sizes, counts and optimizer settings in the ranges that make a run meaningful."""
    m, d, t, ev = exp.model, exp.data, exp.train, exp.eval
    at_least = [(f"config.model.{k}", getattr(m, k), 1)
                for k in ("vocab_size", "embed", "layers", "heads", "kv_heads", "head_dim", "mlp")]
    at_least += [("config.model.window", m.window, 0), ("config.model.block_q", m.block_q, 0),
                 ("config.model.block_k", m.block_k, 0),
                 ("config.data.seq_len", d.seq_len, 1),
                 ("config.data.vocab_size", d.vocab_size, 1),
                 ("config.train.steps", t.steps, 1), ("config.train.batch_size", t.batch_size, 1),
                 ("config.train.warmup_steps", t.warmup_steps, 0),
                 ("config.train.log_every", t.log_every, 1),
                 ("config.train.eval_every", t.eval_every, 0),
                 ("config.train.checkpoint_every", t.checkpoint_every, 1),
                 ("config.train.keep_checkpoints", t.keep_checkpoints, 1),
                 ("config.eval.batch_size", ev.batch_size, 1),
                 ("config.eval.batches", ev.batches, 1),
                 ("config.cpu_devices", exp.cpu_devices, 0)]
    for name, value, low in at_least:
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} is {value!r}; it must be an integer >= {low}")
    lr = t.learning_rate
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr <= MAX_LEARNING_RATE):
        raise ValueError(f"config.train.learning_rate is {lr!r}; it must be in"
                         f" (0, {MAX_LEARNING_RATE}] (e.g. 1e-3)")
    for name, value in (("b1", t.b1), ("b2", t.b2)):
        if not 0 <= value < 1:
            raise ValueError(f"config.train.{name} is {value!r}; it must be in [0, 1)")
    if not 0 <= t.end_learning_rate_fraction <= 1:
        raise ValueError(f"config.train.end_learning_rate_fraction is"
                         f" {t.end_learning_rate_fraction!r}; it must be in [0, 1]")
    if not (t.weight_decay >= 0 and math.isfinite(t.weight_decay)):
        raise ValueError(f"config.train.weight_decay is {t.weight_decay!r}; it must be >= 0")
    if not t.clip_norm > 0:
        raise ValueError(f"config.train.clip_norm is {t.clip_norm!r}; it must be > 0")
    if t.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"config.train.on_nonfinite is {t.on_nonfinite!r}; known: {ON_NONFINITE}")
    for axis, size in exp.mesh:
        if size != -1 and size < 1:
            raise ValueError(f"config.mesh axis {axis!r} has size {size}; sizes are >= 1,"
                             " or -1 for the devices left over")
    if sum(size == -1 for _, size in exp.mesh) > 1:
        raise ValueError(f"config.mesh {dict(exp.mesh)} has more than one axis of size -1;"
                         " at most one axis may take the devices left over")


def _axes_of(rules, logical) -> tuple:
    for name, axes in check_rules("rules", rules):
        if name == logical:
            return axes
    return ()
