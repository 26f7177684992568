"""Device meshes with named axes."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh


def resolve_sizes(axes: Mapping[str, int], num_devices: int, what: str = "mesh axes") -> dict:
    """{axis: size} with one -1 resolved to the devices left over: the one place it happens.

    Raises a ValueError naming `what` (e.g. "config.mesh") when sizes are not
    positive or -1, more than one is -1, or they do not multiply to num_devices.
    """
    names, sizes = list(axes), [int(s) for s in axes.values()]
    if sizes.count(-1) > 1:
        raise ValueError(f"{what} {dict(axes)} has more than one axis of size -1;"
                         " at most one axis may take the devices left over")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{what} {dict(axes)}: sizes are >= 1, or -1 for the devices left over")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{what} {dict(axes)}: {num_devices} devices do not divide by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"{what} {dict(zip(names, sizes))}: the sizes multiply to {math.prod(sizes)}, but"
            f" there are {num_devices} devices; make the product {num_devices} or set one axis"
            " to -1")
    return dict(zip(names, sizes))


def make_mesh(axes: Mapping[str, int], devices=None) -> Mesh:
    """A mesh from {axis name: size}; one size may be -1 to take what is left.

    Axes are `AxisType.Auto` (sharding propagates through XLA, and kernels
    that communicate run under `jax.shard_map`). Raises a `ValueError` naming
    the sizes when they do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(axes, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(list(sizes.values()))
    return Mesh(grid, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))
