"""The README's and docs/' result tables: written from the data files, never by hand."""

import os

import pytest

from lca.bench import figures, records
from lca.bench.records import Point

tables = figures.load_module("tools/tables.py")
results = figures.load_module("tools/results.py")


def _point(impl, t, seconds, temp, *, part="single", n=1, layout="-", heads=4, kv_heads=4,
           mode="fwd+bwd", fits=True, **extra):
    return Point(part, impl, layout, n, heads, kv_heads, t, mode, flops=10**9, temp_bytes=temp,
                 fits=fits, seconds=seconds if fits else None,
                 seconds_min=seconds if fits else None, seconds_max=seconds if fits else None,
                 max_rel_error=3e-7, check_len=256, **extra)


@pytest.fixture
def figures_dir(tmp_path):
    points = [
        _point("xla", 2048, 2.0, 400 * 2**20), _point("blockwise", 2048, 0.5, 20 * 2**20),
        _point("linear", 2048, 0.25, 10 * 2**20),
        _point("xla", 4096, None, 30 * 2**30, fits=False),
        _point("blockwise", 4096, 1.5, 30 * 2**20), _point("linear", 4096, 0.5, 12 * 2**20),
        _point("linear", 16384, 1.0, 2**20, part="linear", mode="fwd"),
        _point("linear", 16384, 3.2768, 2**20, part="linear"),
        _point("linear", 65536, 4.0, 2**20, part="linear", mode="fwd"),
        _point("linear", 65536, 13.1072, 2**20, part="linear"),
    ]
    for impl, local, layout, s in (("ring", "blockwise", "zigzag", 6.0),
                                   ("ringattention", "", "contiguous", 10.0)):
        points.append(_point(impl, 16384, s, 2**25, part="mesh", n=8, layout=layout,
                             local=local))
    meta = {"matmul_peak_gflops": 120.0, "grid": "default", "finished": "2026-11-21"}
    records.write_csv(tmp_path / results.DATA["points"], points, meta)
    records.write_csv(tmp_path / results.DATA["balance"], [
        _point("ring", 32768, s, 0, part="balance", n=8, layout=layout, heads=2, kv_heads=2,
               local="blockwise", block=512)
        for layout, s in (("contiguous", 2.0), ("striped", 1.2), ("zigzag", 1.1))], meta)
    records.write_csv(tmp_path / results.DATA["train"], [
        _point("ring", 16384, 16384 / 6000, 0, part="train", n=8, layout="zigzag", mode="train"),
        _point("xla", 16384, 16384 / 500, 0, part="train", n=8, mode="train"),
        _point("xla", 46080, None, 0, part="context", n=4, mode="train",
               total_bytes=19 * 2**30),
        _point("ring", 4608000, None, 0, part="context", n=4, mode="train",
               total_bytes=20 * 2**30)], meta)
    return tmp_path


def test_tables_are_computed_from_the_data(figures_dir):
    rendered = tables.render(str(figures_dir))
    single = rendered["single"]
    assert "| 4/4 | 2k | 2.000 | 0.500 | 4.0x | 0.250 | 8.0x | 400.0 | 20.0 | 10.0 |" in single
    assert "| 4/4 | 4k | over budget | 1.500 | – | 0.500 | – |" in single
    assert "grid `default`, matmul peak 120 GFLOP/s in that run, 2026-11-21" in single
    assert "| ring | zigzag | 6.00 | 0.60 | 32.0 |" in rendered["mesh"]
    assert "| 65,536 | 61.04 | 200.00 | 1.00 |" in rendered["linear"]
    assert "| striped | 512 | 1.20 | 0.600 | 0.549 (264) | -8.5% |" in rendered["balance"]
    assert "| ring | 6,000 | 4,608,000 | 20.00 | 100x |" in rendered["train"]
    assert "| 4/4 | 16,384 | 32.0 |" in rendered["memory-check"]
    questions = rendered["questions"]
    assert "4.0x at 2k" in questions
    assert "at 4k dense needs 30.0 GiB and is not run" in questions
    assert "`zigzag`: ring critical path 0.55x contiguous's (cost model 0.53)" in questions
    assert "`ring` 4.61M tokens (100x)" in questions
    assert "from 2k tokens (0.50x the time; 0.33x at 4k)" in questions


def test_a_table_without_data_is_kept_and_the_rest_rewritten(tmp_path):
    text = ("intro\n<!-- table:train -->\nold\n<!-- /table:train -->\n"
            "<!-- table:linear -->\nstale\n<!-- /table:linear -->\noutro\n")
    new, written, kept = tables.update_text(text, {"train": None, "linear": "| new |"})
    assert new == ("intro\n<!-- table:train -->\nold\n<!-- /table:train -->\n"
                   "<!-- table:linear -->\n| new |\n<!-- /table:linear -->\noutro\n")
    assert (written, kept) == (["linear"], ["train"])
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        tables.update_text("<!-- table:nope -->\n<!-- /table:nope -->", {"linear": ""})


@pytest.mark.parametrize("path", tables.markdown_files(), ids=os.path.basename)
def test_committed_tables_are_what_the_data_in_docs_figures_gives(path):
    """Fails when a number in a marked table was edited by hand, or the data changed
    without `python experiments/figures.py --tables`."""
    with open(path) as f:
        text = f.read()
    new, written, kept = tables.update_text(text, tables.render(tables.FIGURES_DIR), where=path)
    assert not kept, f"{path}: no data in docs/figures for {kept}"
    assert new == text, f"{path}: run python experiments/figures.py --tables"


def test_the_readme_has_every_results_table():
    with open(tables.markdown_files()[0]) as f:
        _, written, _ = tables.update_text(f.read(), tables.render(tables.FIGURES_DIR))
    assert {"questions", "single", "mesh", "linear", "balance", "train"} <= set(written)


def test_producers_get_quick_only_when_they_take_it(tmp_path):
    module = tmp_path / "producers.py"
    module.write_text("def plain(out):\n    open(out + '/plain', 'w').write('x')\n"
                      "def quick(out, quick=False):\n    open(out + '/q', 'w').write(str(quick))\n")
    notes = figures.run_producers(str(tmp_path), [("p", str(module), "plain"),
                                                  ("q", str(module), "quick")], quick=True)
    assert len(notes) == 2 and (tmp_path / "q").read_text() == "True"
    assert (tmp_path / "plain").exists()
