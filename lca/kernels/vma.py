"""Varying-manual-axes bookkeeping, so kernels trace under `jax.shard_map(check_vma=True)`.

Inside `shard_map`, JAX types every value with the mesh axes it varies over.
A fresh `jnp.zeros` varies over none, so a scan carry or a `lax.switch` branch
that starts from zeros does not type-check against one computed from the
inputs. `like(x, *refs)` marks x as varying wherever any ref does; outside
`shard_map` it returns x unchanged.
"""

from __future__ import annotations

import jax
from jax import lax


def _vma(x):
    aval = jax.typeof(x)
    if hasattr(aval, "vma"):  # JAX <= 0.8
        return aval.vma
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset() if mat is None else mat.varying


def like(tree, *refs):
    """Every leaf of `tree`, cast to vary over the manual axes any of `refs` varies over."""
    axes = frozenset().union(*(_vma(r) for r in jax.tree.leaves(refs)))
    if not axes:
        return tree

    def cast(x):
        missing = tuple(sorted(axes - _vma(x)))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)
