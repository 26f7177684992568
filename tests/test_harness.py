"""The suite's own machinery: device count, mesh fixtures, subprocesses."""

import jax


def test_suite_sees_eight_cpu_devices():
    assert jax.device_count() == 8
    assert {d.platform for d in jax.devices()} == {"cpu"}


def test_mesh_fixtures_have_named_axes(mesh8, mesh2x4, mesh2x2x2):
    assert dict(mesh8.shape) == {"sequence": 8}
    assert dict(mesh2x4.shape) == {"data": 2, "sequence": 4}
    assert dict(mesh2x2x2.shape) == {"data": 2, "sequence": 2, "tensor": 2}


def test_subprocess_runs_with_another_device_count(devices_subprocess):
    out = devices_subprocess(3, "import jax; print(jax.device_count())")
    assert out.strip() == "3"
