"""The benchmark suite's rows: columns, compile-time figures that repeat, a wrong kernel caught."""

import dataclasses

import jax.numpy as jnp
import pytest

from lca.bench import figures, records, suite, summary
from lca.bench import kernels as bench_kernels

GRID = suite.Grid(single_lens=(128,), heads=((2, 2),), mesh_lens=(), mesh_sizes=(),
                  mesh_sizes_len=0, linear_lens=(), linear_parallel_len=0, repeats=1,
                  head_dim=16, check_len=64)


def _zeros(mesh, layout, small):
    return lambda q, k, v: jnp.zeros_like(q)


KERNELS = {"single": {"xla": bench_kernels.default_kernels()["single"]["xla"],
                      "zeros": bench_kernels.Kernel("softmax", _zeros, "zeros")}}


@pytest.fixture(scope="module")
def two_runs():
    return [suite.run(GRID, ("single",), kernels=KERNELS, progress=False) for _ in range(2)]


def test_csv_has_one_row_per_point_with_every_column(two_runs, tmp_path):
    path = tmp_path / "bench_suite.csv"
    records.write_csv(path, two_runs[0], {"matmul_peak_gflops": 100.0})
    header = path.read_text().splitlines()[0].split(",")
    assert header == [f.name for f in dataclasses.fields(records.Point)] + ["matmul_peak_gflops"]
    assert records.read_points(path) == two_runs[0]
    assert {(p.impl, p.mode) for p in two_runs[0]} == {
        (impl, mode) for impl in ("xla", "zeros") for mode in suite.MODES}


def test_flops_and_memory_are_positive_integers_identical_across_runs(two_runs):
    first, second = ([(p.impl, p.mode, p.flops, p.temp_bytes, p.fits) for p in run]
                     for run in two_runs)
    assert first == second
    for p in two_runs[0]:
        assert isinstance(p.flops, int) and p.flops > 0
        assert isinstance(p.temp_bytes, int) and p.temp_bytes >= 0
        assert p.seconds_min <= p.seconds <= p.seconds_max


def test_a_wrong_kernel_gets_a_large_error_beside_its_time(two_runs):
    for p in two_runs[0]:
        assert p.seconds is not None and p.check_len == GRID.check_len
        if p.impl == "zeros":
            assert p.max_rel_error > 0.5, p
        else:
            assert p.max_rel_error < 2e-5, p
            assert p.vs_baseline == 1.0


def test_a_second_run_reports_identical_compile_time_figures(two_runs):
    text = summary.compare(*two_runs)
    assert "4 common points; FLOPs, temp bytes and fit identical for 4" in text


def test_a_figure_producer_that_does_not_exist_yet_is_skipped(tmp_path):
    notes = figures.run_producers(str(tmp_path), [("a plot", "tools/not_written_yet.py", "f")])
    assert notes == ["skipped a plot: tools/not_written_yet.py has no f() yet"]


def test_the_table_and_key_figures_mark_the_wrong_kernel(two_runs):
    table = records.format_points(two_runs[0]).splitlines()
    assert all(line.endswith("WRONG") == (" zeros " in line) for line in table[1:])
    assert "WRONG against the float64 reference: zeros/-" in summary.key_figures(two_runs[0])


def test_compare_says_how_far_each_median_left_the_other_runs_spread():
    base = records.Point("single", "xla", "-", 1, 2, 2, 128, "fwd", flops=10, temp_bytes=5,
                         fits=True, seconds=1.0, seconds_min=0.95, seconds_max=1.05)
    moved = dataclasses.replace(base, seconds=1.2, seconds_min=1.1, seconds_max=1.3)
    far = dataclasses.replace(moved, seconds=2.0, seconds_min=1.9, seconds_max=2.1)
    near, inside = summary.compare([base], [moved]), summary.compare([base], [base])
    assert "inside the other run's min-max spread: 0 of 1; outside by up to 10%: 1" in near
    assert "(9% outside)" in near  # 1.0 below 1.1: the nearer of the two distances
    assert "inside the other run's min-max spread: 1 of 1; outside by up to 10%: 0" in inside
    assert "by more: 1" in summary.compare([base], [far])
