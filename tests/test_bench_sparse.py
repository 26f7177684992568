"""The sparse benchmark part on tiny sizes: its rows, CSV and plot, and the masked reference
its sparse rows are checked against. No timing is checked."""

import jax
import numpy as np
import pytest

from lca import sparse as sparse_lib
from lca.bench import records, sparse

TINY = sparse.Grid(lengths=(128,), hyper_lengths=(256,), gqa_lengths=(), buckets=(4,),
                   drops=(0.5,), small_block=32, hyper_block=32, hyper_samples=(32,), repeats=1,
                   hyper_repeats=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse")
    return out, sparse.run(str(out), grid=TINY, log=lambda line: None)


def test_the_part_writes_one_row_per_point_and_its_plot(tiny_run):
    out, rows = tiny_run
    got = {(p.impl, p.block, p.heads, p.kv_heads, p.seq_len, p.mode) for p in rows}
    fwd_bwd = {("blockwise", 128), ("bucketed/4", 128), ("bucketed/4", 32), ("dropped/k50", 128)}
    want = {(i, b, 4, 4, 128, "fwd+bwd") for i, b in fwd_bwd}
    hyper = {("blockwise", 256, 4, 4, 256, "fwd"), ("hyper/m32", 32, 4, 4, 256, "fwd")}
    assert got == want | hyper
    assert len(rows) == len(got)
    assert records.read_points(out / sparse.FILE) == rows
    assert (out / sparse.FIGURE).stat().st_size > 0
    for p in rows:
        assert p.baseline == "blockwise" and p.vs_baseline is not None
        assert p.max_rel_error is not None and p.check_len == p.seq_len
    assert all(p.max_rel_error < 1e-6 for p in rows if p.impl == "blockwise")


def test_sparse_rows_match_their_own_masks_exact_attention(tiny_run):
    out, rows = tiny_run
    extras = records.read_extras(out / sparse.FILE)
    for p, extra in zip(rows, extras):
        if p.impl.startswith(("bucketed", "dropped")):
            assert float(extra["mask_rel_error"]) < 1e-5, (p.impl, p.block, extra)
        else:
            assert extra["mask_rel_error"] == ""
    assert "own mask's exact attention" in sparse.key_figures(
        rows, [float(e["mask_rel_error"]) if e["mask_rel_error"] else None for e in extras])


def test_the_masked_reference_is_dense_attention_when_every_id_is_equal():
    q, k, v, _ = sparse._inputs(64, 4, 2, seed=1)
    zeros = lambda x: np.zeros(x.shape[:3], np.int32)
    np.testing.assert_allclose(sparse.masked_exact(q, k, v, zeros(q), zeros(k)),
                               sparse._dense().attend(q, k, v), rtol=1e-5, atol=1e-6)


def test_bucketed_rows_hash_as_hash_buckets_when_every_head_has_its_own_kv_head():
    q, k, _, _ = sparse._inputs(64, 4, 4, seed=2)
    key = jax.random.key(0)
    qb, kb = sparse._bucketed(4, 4, 4, key, 32).segments(q, k)
    np.testing.assert_array_equal(qb, sparse_lib.hash_buckets(q, 4, key))
    np.testing.assert_array_equal(kb, sparse_lib.hash_buckets(k, 4, key))
