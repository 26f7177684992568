"""Test harness: 8 emulated CPU devices, standard meshes, other device counts in subprocesses."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

# Before any backend exists: the whole suite sees 8 CPU devices, and float64
# is available for the reference oracle.
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)

from lca.parallel import make_mesh  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def mesh8():
    return make_mesh({"sequence": 8})


@pytest.fixture(scope="session")
def mesh2x4():
    return make_mesh({"data": 2, "sequence": 4})


@pytest.fixture(scope="session")
def mesh2x2x2():
    return make_mesh({"data": 2, "sequence": 2, "tensor": 2})


def run_with_devices(num_devices: int, body: str, timeout: float = 600) -> str:
    """Runs `body` (Python source) in a fresh interpreter with `num_devices` CPU devices.

    The body may import lca and jax freely; it fails the calling test by
    raising. Returns its stdout.
    """
    prologue = textwrap.dedent(f"""
        import jax
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", {num_devices})
        jax.config.update("jax_enable_x64", True)
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(body)],
                            capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(
            f"subprocess with {num_devices} devices failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@pytest.fixture
def devices_subprocess():
    """The `run_with_devices(num_devices, body)` helper, as a fixture."""
    return run_with_devices
