"""The device benchmark part: its plan per platform, and its measuring path on a stand-in."""

import csv
import types

import jax
import jax.numpy as jnp
import pytest
from attention_cases import TOLERANCE

from lca.bench import device


def _stand_in(platform, kind):
    return types.SimpleNamespace(platform=platform, device_kind=kind)


def test_without_an_accelerator_it_says_so_and_measures_nothing(capsys, tmp_path):
    assert device.run(tmp_path, devices=jax.devices("cpu")) == []
    assert "no accelerator" in capsys.readouterr().out
    assert not (tmp_path / "bench_device.csv").exists()


@pytest.mark.parametrize("platform,kind,kernel,dense,peak", [
    ("gpu", "NVIDIA H200", "pallas_gpu", "xla/cudnn", 989.0),
    ("tpu", "TPU v5p", "splash", "xla/xla", 459.0),
    ("tpu", "TPU v5 lite", "splash", "xla/xla", 197.0),
])
def test_the_plan_follows_the_platform(platform, kind, kernel, dense, peak):
    found = device.accelerator([jax.devices("cpu")[0], _stand_in(platform, kind)])
    assert found.device_kind == kind
    got_platform, kernels = device.plan(found)
    assert got_platform == platform
    assert [label for label, _ in kernels] == [kernel, "blockwise", dense]
    assert device.peak(kind) == peak * 1e12
    assert device.peak("some new chip") is None


def test_the_measuring_path_on_a_stand_in(monkeypatch, tmp_path):
    """The CPU stands in for the accelerator, with kernels that run here."""
    cpu = jax.devices("cpu")[0]
    monkeypatch.setattr(device, "accelerator", lambda devices=None: cpu)
    monkeypatch.setattr(device, "plan", lambda d: ("cpu", [("blockwise", {"impl": "blockwise"}),
                                                         ("xla/xla", {"impl": "xla"})]))
    rows = device.run(tmp_path, lengths=(256,), heads=((2, 1),), repeats=1)
    assert [(r.kernel, r.mode) for r in rows] == [
        ("blockwise", "fwd"), ("blockwise", "fwd+bwd"), ("xla/xla", "fwd"), ("xla/xla", "fwd+bwd")]
    assert all(r.seconds > 0 and r.tflops > 0 and r.peak_fraction is None for r in rows)
    assert all(r.check_error <= TOLERANCE[jnp.bfloat16] for r in rows)
    with open(tmp_path / "bench_device.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "| blockwise | 2/1 | 256 | fwd+bwd |" in device.table(rows)


def test_a_point_that_fails_is_a_row_that_says_why(monkeypatch, tmp_path):
    cpu = jax.devices("cpu")[0]
    monkeypatch.setattr(device, "accelerator", lambda devices=None: cpu)
    monkeypatch.setattr(device, "plan", lambda d: ("cpu", [("blockwise", {"impl": "blockwise"})]))

    def out_of_memory(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 512 GiB\nmore")
    monkeypatch.setattr(device.timing, "median_seconds", out_of_memory)
    rows = device.run(tmp_path, lengths=(256,), heads=((2, 1),), repeats=1)
    assert [r.seconds for r in rows] == [None, None]
    assert rows[0].note == "RESOURCE_EXHAUSTED: out of memory allocating 512 GiB"
    assert "did not run: RESOURCE_EXHAUSTED" in device.table(rows)
