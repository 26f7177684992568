"""Device meshes with named axes."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh


def make_mesh(axes: Mapping[str, int], devices=None) -> Mesh:
    """A mesh from {axis name: size}; one size may be -1 to take what is left.

    Axes are `AxisType.Auto` (sharding propagates through XLA, and kernels
    that communicate run under `jax.shard_map`). Raises a `ValueError` naming
    the sizes when they do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = list(axes), [int(s) for s in axes.values()]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1; got {dict(axes)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1; got {dict(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh axes {dict(axes)}: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh axes {dict(zip(names, sizes))} multiply to {math.prod(sizes)},"
            f" but there are {len(devices)} devices; make the product {len(devices)}"
            " or set one axis to -1")
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, tuple(names), axis_types=(AxisType.Auto,) * len(names))
