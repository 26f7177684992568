"""The decode benchmark part on tiny sizes: its rows, CSV and plot, bytes per step, and the
filled cache it times against, which must decode as a prefilled one. No timing is checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca import generation
from lca.bench import decode, records
from lca.models import Transformer

TINY = decode.Grid(lengths=(64, 128), recompute_max=64, prefill_lens=(64,), steps=2, repeats=1,
                   strategies=("ring", "ulysses"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    return out, decode.run(str(out), grid=TINY, devices=8, log=lambda line: None)


def test_the_part_writes_one_row_per_point_and_its_plot(tiny_run):
    out, rows = tiny_run
    assert {(p.impl, p.n, p.seq_len, p.mode) for p in rows} == {
        ("cache", 1, 64, "decode"), ("cache", 1, 128, "decode"), ("recompute", 1, 64, "decode"),
        *((impl, 8, t, "decode") for impl in ("cache_sharded", "cache_gathered")
          for t in (64, 128)),
        ("ring", 8, 64, "prefill"), ("ulysses", 8, 64, "prefill")}
    assert len(rows) == 9
    assert records.read_points(out / decode.FILE) == rows
    assert (out / decode.FIGURE).stat().st_size > 0
    cache = next(p for p in rows if (p.impl, p.seq_len) == ("cache", 64))
    assert cache.baseline == "recompute" and cache.vs_baseline is not None


def test_the_sharded_cache_sends_the_same_bytes_at_every_length(tiny_run):
    _, rows = tiny_run
    sent = {(p.impl, p.seq_len): p.sent_bytes for p in rows if p.n > 1 and p.mode == "decode"}
    assert sent["cache_sharded", 64] == sent["cache_sharded", 128] > 0
    assert sent["cache_gathered", 128] > sent["cache_gathered", 64] > sent["cache_sharded", 64]
    assert "at every L (constant)" in decode.key_figures(rows)


@pytest.mark.parametrize("on_mesh", [False, True], ids=["one-device", "mesh"])
def test_a_filled_cache_decodes_as_a_prefilled_one(mesh8, on_mesh):
    """The benchmark's cache at length L: prefill's slot positions and counts, so with
    prefill's K/V it gives prefill's logits."""
    length, capacity = 32, 32 + decode.SLACK
    ctx = generation.context(mesh8) if on_mesh else None
    graphdef, state = nnx.split(Transformer(decode.config(), rngs=nnx.Rngs(0)))
    if on_mesh:
        state = generation._on_mesh(state, mesh8)
    tokens = np.random.default_rng(0).integers(0, 128, (1, length)).astype(np.int32)
    prefill, step = generation._programs(graphdef, ctx, length, capacity, 1)
    make_empty, _ = generation._programs(graphdef, ctx, 0, capacity, 1)
    _, prefilled = prefill(state, tokens)
    _, empty = make_empty(state, tokens[:, :0])
    made = decode.filled(empty, length, ctx, layers=jax.tree.map(jnp.copy, prefilled.layers))
    for field in ("positions", "length", "prefilled"):
        np.testing.assert_array_equal(getattr(made, field), getattr(prefilled, field))
    assert made.meta == prefilled.meta
    want = np.asarray(step(state, prefilled, tokens[:, 0])[0])
    np.testing.assert_array_equal(np.asarray(step(state, made, tokens[:, 0])[0]), want)
