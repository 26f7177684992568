"""Config files by path, as `--config configs/NAME.py[:variant]` names them."""

from __future__ import annotations

import importlib.util
import os


def module(path: str):
    """Imports a config file (or a sibling a config builds on) by its path."""
    path = os.path.abspath(path)
    name = "lca_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ValueError(f"no config file at {path!r}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sibling(config_file: str, name: str):
    """`sibling(__file__, "passkey")`: the config module next to this one."""
    return module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name + ".py"))


def load(spec: str):
    """'configs/passkey.py:smoke' -> the ConfigDict its get_config('smoke') returns."""
    path, _, arg = spec.partition(":")
    return module(path).get_config(arg)


def set_kernel(c, variant: str) -> bool:
    """A variant naming a kernel of `lca.kernels.registry` (`:ring`, `:xla`, ...) sets
    `c.model.attention` to it and fits the mesh to it (`fit_mesh`); returns whether the
    variant was one."""
    from lca.kernels import registry  # JAX only when a config asks

    if variant not in registry.names():
        return False
    c.model.attention = variant
    fit_mesh(c, registry.get(variant))
    return True


def fit_mesh(c, entry) -> None:
    """Reshapes `c.mesh`, on the same devices, so a strategy can run: one that takes two
    axes gets the sequence split into (ulysses 2, sequence / 2); one whose `check` refuses
    the heads over the sequence axis gets the largest sequence size it takes, the rest of
    the devices going to `data`; a sparse kernel, sequence 1 (its devices to `tensor` as far
    as the heads split, the rest to `data`)."""
    mesh = {axis: int(size) for axis, size in dict(c.mesh).items()}
    seq = mesh.get("sequence", 1)
    if entry.kind == "sparse":  # one sequence shard: its devices split heads, then the batch
        tensor = mesh.get("tensor", 1)
        splits = lambda d: c.model.heads % (tensor * d) == 0 == c.model.kv_heads % (tensor * d)
        split = max(d for d in range(1, seq + 1) if seq % d == 0 and splits(d))
        mesh.update(tensor=tensor * split, data=mesh.get("data", 1) * (seq // split), sequence=1)
    elif getattr(entry, "axes", 1) == 2:
        if "ulysses" not in mesh and seq % 2 == 0:
            mesh = {a: s for a, s in mesh.items() if a != "sequence"}
            mesh.update(ulysses=2, sequence=seq // 2)
    elif getattr(entry, "check", None) is not None:
        fits = lambda n: entry.takes(c.model.heads, c.model.kv_heads, (("sequence", n),))
        size = max(d for d in range(1, seq + 1) if seq % d == 0 and fits(d))
        if size != seq:
            mesh.update(data=mesh.get("data", 1) * (seq // size), sequence=size)
    c.mesh = mesh


def unknown_variant(config_file: str, variant: str, own: tuple[str, ...]):
    """The ValueError for a variant a config does not know, listing the ones it does."""
    from lca.kernels import registry

    known = ", ".join(own + tuple(registry.names()))
    return ValueError(f"configs/{os.path.basename(config_file)}: unknown variant {variant!r};"
                      f" known: {known}")
