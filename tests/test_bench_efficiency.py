"""The efficiency benchmark part on tiny sizes: its rows, CSV, plot and key figures. No timing
is checked."""

import pytest

from lca.bench import efficiency, records

TINY = efficiency.Grid(lengths=(512, 1024), blocks=(256, 512), repeats=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficiency")
    return out, efficiency.run(str(out), grid=TINY, log=lambda line: None)


def test_one_row_per_length_and_tile_with_its_peak_fraction(tiny_run):
    out, rows = tiny_run
    assert [(p.seq_len, p.block) for p in rows] == [(512, 256), (512, 512), (1024, 256),
                                                    (1024, 512)]
    assert records.read_points(out / efficiency.FILE) == rows
    assert (out / efficiency.FIGURE).stat().st_size > 0
    for p in rows:
        assert p.part == "efficiency" and p.mode == "fwd+bwd" and p.baseline == "blockwise/512"
        assert p.flops == 3.5 * 4 * 4 * p.seq_len ** 2 * 64 / 2  # useful causal FLOPs
        assert 0 < p.peak_fraction and p.temp_bytes > 0
    assert [p.vs_baseline for p in rows if p.block == 512] == [1.0, 1.0]


def test_key_figures_judge_the_longest_length_against_the_best():
    row = lambda t, b, f, s: records.Point(
        "efficiency", "blockwise", "-", 1, 4, 4, t, "fwd+bwd", 1, 1, True, block=b, seconds=s,
        peak_fraction=f, baseline="blockwise/512")
    met = efficiency.key_figures([row(2048, 512, 0.60, 1.0), row(4096, 512, 0.56, 3.0),
                                  row(4096, 256, 0.40, 4.0)])
    assert "at 4,096 93% of its best (2,048): goal 90% MET" in met
    assert "fastest tile by length: 2k 512, 4k 512" in met
    missed = efficiency.key_figures([row(2048, 512, 0.60, 1.0), row(4096, 512, 0.50, 3.0)])
    assert "83% of its best" in missed and "MISSED" in missed
