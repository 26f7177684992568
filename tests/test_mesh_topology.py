"""Meshes on the hardware's topology, with stand-in TPU devices (coords, slice_index): the
ring axis inside a slice along the physical links, the dcn axis across slices."""

import dataclasses

import jax
import numpy as np
import pytest

from lca.parallel import make_mesh, mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class StandInTpu:
    """The attributes JAX's mesh constructors read from a TPU device."""

    id: int
    coords: tuple
    slice_index: int
    process_index: int
    core_on_chip: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v4"


def two_slices(shape=(4, 1, 1), seed=0):
    """Two slices of `shape` chips, one device per chip, listed in a scrambled order (as a
    multi-host device list need not follow the torus), one process per 2 chips."""
    devices = []
    for s in range(2):
        for i, c in enumerate(np.ndindex(*shape)):
            devices.append(StandInTpu(len(devices), c, s, (s * len(list(np.ndindex(*shape)))
                                                           + i) // 2))
    order = np.random.default_rng(seed).permutation(len(devices))
    return [devices[i] for i in order]


def test_the_ring_axis_stays_in_a_slice_along_the_torus_and_data_crosses_slices():
    grid = mesh_lib.device_grid({"data": 2, "sequence": 4}, two_slices(), dcn={"data": 2})
    assert grid.shape == (2, 4)
    for row in grid:  # one slice per data index, its chips in physical order
        assert len({d.slice_index for d in row}) == 1
        assert [d.coords[0] for d in row] == [0, 1, 2, 3]
    assert [grid[i, 0].slice_index for i in range(2)] == [0, 1]
    lines = mesh_lib.describe(grid, ("data", "sequence"))
    assert lines[0].startswith("data (2): 2 slices")
    assert lines[1] == ("sequence (4): 1 slice, 2 processes, physical x:"
                        " (0,0,0) (1,0,0) (2,0,0) (3,0,0)")


def test_a_dcn_split_of_a_larger_axis_keeps_each_slice_contiguous():
    grid = mesh_lib.device_grid({"data": 4, "sequence": 4}, two_slices((2, 4, 1)),
                                dcn={"data": 2})
    for half in (grid[:2], grid[2:]):
        assert len({d.slice_index for d in half.ravel()}) == 1
    for row in grid:  # the sequence axis: neighbouring chips of one slice
        steps = [np.abs(np.subtract(a.coords, b.coords)).sum() for a, b in zip(row, row[1:])]
        assert steps == [1, 1, 1], [d.coords for d in row]


def test_without_a_topology_the_order_is_the_device_list():
    devices = jax.devices()
    mesh = make_mesh({"data": 2, "sequence": 4})
    assert list(mesh.devices.ravel()) == devices[:8]


@pytest.mark.parametrize("dcn, message", [
    ({"tensor": 2}, "dcn names axis 'tensor', which is not in the mesh"),
    ({"sequence": 3}, r"dcn\['sequence'\] = 3 must be >= 1 and divide the axis size 4"),
    ({"sequence": 4}, r"dcn \{'sequence': 4\} splits the mesh into 4 slices, but the devices"
                      r" are on 2 slice\(s\)"),
])
def test_bad_dcn_is_named(dcn, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.device_grid({"data": 2, "sequence": 4}, two_slices(), dcn=dcn)


def test_config_dcn_is_checked_against_the_mesh_before_anything_runs():
    from lca.train import config_files, from_config, validate
    from lca.train.loop import run_mesh

    c = config_files.load("configs/passkey.py:smoke")
    c.dcn = {"sequence": 3}
    with pytest.raises(ValueError, match=r"config.dcn\['sequence'\] = 3 must be >= 1 and"
                                         r" divide the axis size 4"):
        validate(from_config(c), num_devices=8)
    c.dcn = {"data": 2}  # one process here: one slice
    with pytest.raises(ValueError, match=r"config.dcn \{'data': 2\} splits the mesh into 2"
                                         r" slices, but the devices are on 1 process"):
        run_mesh(from_config(c))
    c.dcn = {"model": 2}
    with pytest.raises(ValueError, match="config.dcn names axis 'model', which is not in"
                                         " config.mesh"):
        from_config(c)


@dataclasses.dataclass(frozen=True)
class StandInCpu:
    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_without_slices_each_process_is_one():
    """CPU devices have no slice_index: dcn={'data': 2} puts the two processes' devices on
    the two data rows (as two hosts of a multi-process CPU run)."""
    devices = [StandInCpu(i, p) for i, p in enumerate([0, 1, 0, 1, 0, 1, 0, 1])]
    grid = mesh_lib.device_grid({"data": 2, "sequence": 4}, devices, dcn={"data": 2})
    assert [[d.process_index for d in row] for row in grid] == [[0] * 4, [1] * 4]
    assert mesh_lib.describe(grid, ("data", "sequence"))[1] == "sequence (4): 1 slice, 1 process"
