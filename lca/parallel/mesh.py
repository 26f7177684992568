"""Device meshes with named axes, placed on the hardware's topology.

Axes are listed from the least to the most communication (data, fsdp, ...,
sequence, tensor): on a TPU slice JAX's topology-aware constructor
(`jax.experimental.mesh_utils.create_device_mesh`) maps the last axes onto the
physical torus links first, so a ring or an all-to-all over the sequence axis
runs between neighbouring chips. `dcn` splits axes over slices (the
data-center network between them, as MaxText's `dcn_*` parallelism does):
each slice holds a full inner mesh (`create_hybrid_device_mesh`), so an axis
that is not in `dcn` never leaves a slice. Devices without a `slice_index`
(CPU, GPU) count each process as a slice, so a multi-process CPU run can
place an axis across processes the same way. On CPU (and any platform JAX
has no topology for) the devices keep the order `jax.devices()` lists them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
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


def check_dcn(dcn: Mapping[str, int], sizes: Mapping[str, int], what: str = "dcn") -> dict:
    """{axis: slices}: every axis a mesh axis, every size >= 1 and dividing its axis."""
    dcn = {str(a): int(n) for a, n in dict(dcn or {}).items()}
    for axis, n in dcn.items():
        if axis not in sizes:
            raise ValueError(f"{what} names axis {axis!r}, which is not in the mesh"
                             f" {dict(sizes)}")
        if n < 1 or sizes[axis] % n:
            raise ValueError(f"{what}[{axis!r}] = {n} must be >= 1 and divide the axis size"
                             f" {sizes[axis]} (the axis is split into {n} slices of"
                             f" {sizes[axis]} / {n} devices)")
    return dcn


def device_grid(axes: Mapping[str, int], devices=None, *, dcn=None,
                dcn_name: str = "dcn") -> np.ndarray:
    """The devices of `make_mesh`, as an array shaped by the resolved sizes; errors about
    `dcn` name it `dcn_name` (e.g. "config.dcn")."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(axes, len(devices))
    shape = list(sizes.values())
    dcn = check_dcn(dcn, sizes, dcn_name)
    if not dcn:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    by_process = not hasattr(devices[0], "slice_index")  # CPU/GPU: a process is a "slice"
    attr = "process_index" if by_process else "slice_index"
    slices = sorted({getattr(d, attr) for d in devices})
    outer = [dcn.get(a, 1) for a in sizes]
    if math.prod(outer) != len(slices):
        raise ValueError(f"{dcn_name} {dcn} splits the mesh into {math.prod(outer)} slices, but the"
                         f" devices are on {len(slices)} {'process' if by_process else 'slice'}"
                         f"(s) ({attr} {slices})")
    if len(slices) == 1:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    inner = [size // n for size, n in zip(shape, outer)]
    return mesh_utils.create_hybrid_device_mesh(inner, outer, devices,
                                                process_is_granule=by_process,
                                                allow_split_physical_axes=True)


def make_mesh(axes: Mapping[str, int], devices=None, *, dcn=None,
              dcn_name: str = "dcn") -> Mesh:
    """A mesh from {axis name: size}; one size may be -1 to take what is left.

    Axes go from the least to the most communication; on a TPU the devices are
    placed by JAX's topology-aware constructors (module docstring). dcn:
    {axis: slices}, the axes split over slices (their product is the number of
    slices the devices are on); None: one slice. Axes are `AxisType.Auto`
    (sharding propagates through XLA, and kernels that communicate run under
    `jax.shard_map`). Raises a `ValueError` naming the sizes when they do not
    multiply to the number of devices, or dcn when it does not fit.
    """
    sizes = resolve_sizes(axes, len(list(jax.devices() if devices is None else devices)))
    grid = device_grid(axes, devices, dcn=dcn, dcn_name=dcn_name)
    return Mesh(grid, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


def describe(grid: np.ndarray, names) -> list[str]:
    """One line per axis: its size and what it crosses, from the first device's line along
    it: slices, processes, and (devices with `coords`) the physical coordinates."""
    lines = []
    for i, name in enumerate(names):
        index = [0] * grid.ndim
        index[i] = slice(None)
        along = list(grid[tuple(index)])
        slices = len({getattr(d, "slice_index", 0) for d in along})
        processes = len({getattr(d, "process_index", 0) for d in along})
        where = f"{slices} slice{'s' * (slices > 1)}, {processes} process" \
            + ("es" if processes > 1 else "")
        if hasattr(along[0], "coords"):
            coords = [tuple(d.coords) for d in along]
            varies = [axis for axis, label in enumerate("xyz")
                      if len({c[axis] for c in coords}) > 1]
            shown = " ".join("(" + ",".join(map(str, c)) + ")" for c in coords[:8])
            where += f", physical {'/'.join('xyz'[a] for a in varies) or '-'}: {shown}" \
                + (" ..." if len(coords) > 8 else "")
        lines.append(f"{name} ({len(along)}): {where}")
    return lines
