"""lca.layouts: which tokens each shard holds, permute/unpermute, and length checks."""

import jax.numpy as jnp
import numpy as np
import pytest

from lca import layouts


def test_contiguous_shards_hold_consecutive_tokens():
    np.testing.assert_array_equal(layouts.shard_positions(8, "contiguous", 2),
                                  [[0, 1, 2, 3], [4, 5, 6, 7]])


def test_striped_is_round_robin_with_a_stripe_width():
    np.testing.assert_array_equal(layouts.shard_positions(8, "striped", 4),
                                  [[0, 4], [1, 5], [2, 6], [3, 7]])
    np.testing.assert_array_equal(layouts.shard_positions(12, "striped", 2, stripe=2),
                                  [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]])


def test_zigzag_shard_r_holds_chunks_r_and_2n_minus_1_minus_r():
    np.testing.assert_array_equal(layouts.shard_positions(16, "zigzag", 4),
                                  [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]])
    n, chunk = 8, 3
    shards = layouts.shard_positions(2 * n * chunk, "zigzag", n)
    for r in range(n):
        want = np.r_[np.arange(r * chunk, (r + 1) * chunk),
                     np.arange((2 * n - 1 - r) * chunk, (2 * n - r) * chunk)]
        np.testing.assert_array_equal(shards[r], want)


@pytest.mark.parametrize("layout,stripe", [("contiguous", 1), ("striped", 1), ("striped", 3),
                                           ("zigzag", 1)])
@pytest.mark.parametrize("num_shards", [1, 2, 4, 8])
def test_permute_matches_positions_and_unpermute_inverts_it(layout, stripe, num_shards):
    seq_len = 2 * 3 * num_shards * stripe
    x = np.random.default_rng(0).standard_normal((2, seq_len, 3))
    pos = layouts.positions(seq_len, layout, num_shards, stripe=stripe)
    assert pos.dtype == np.int32 and sorted(pos) == list(range(seq_len))
    for array in (x, jnp.asarray(x)):
        y = layouts.permute(array, layout, num_shards, stripe=stripe)
        assert type(y) is type(array)
        np.testing.assert_array_equal(np.asarray(y), x[:, pos])
        back = layouts.unpermute(y, layout, num_shards, stripe=stripe)
        np.testing.assert_array_equal(np.asarray(back), x)


def test_permute_along_another_axis():
    x = np.arange(2 * 3 * 8).reshape(2, 3, 8)
    y = layouts.permute(x, "zigzag", 2, axis=-1)
    np.testing.assert_array_equal(y, x[..., layouts.positions(8, "zigzag", 2)])
    np.testing.assert_array_equal(layouts.unpermute(y, "zigzag", 2, axis=2), x)


def test_every_shard_gets_the_same_causal_work_with_striped_and_zigzag():
    """Causal pairs (i >= j) per shard: contiguous is skewed, the others are flat."""
    n, seq_len = 4, 64

    def work(layout):
        return np.array([(shard + 1).sum() for shard in layouts.shard_positions(seq_len, layout, n)])

    assert work("contiguous").max() > 3 * work("contiguous").min()
    assert len(set(work("zigzag"))) == 1
    assert work("striped").max() < 1.1 * work("striped").min()  # off by one token per row


@pytest.mark.parametrize("layout,num_shards,stripe,seq_len,nearest", [
    ("contiguous", 4, 1, 10, [8, 12]),
    ("zigzag", 4, 1, 12, [8, 16]),
    ("zigzag", 8, 1, 5, [16]),
    ("striped", 4, 3, 30, [24, 36]),
])
def test_bad_length_names_the_layout_and_nearest_valid_lengths(layout, num_shards, stripe,
                                                               seq_len, nearest):
    with pytest.raises(ValueError, match=rf"layout='{layout}'.*nearest valid lengths: "
                                         rf"\[{', '.join(map(str, nearest))}\]"):
        layouts.positions(seq_len, layout, num_shards, stripe=stripe)


def test_bad_names_and_options():
    with pytest.raises(ValueError, match=r"layout must be one of \['contiguous', 'striped', 'zigzag'\]"):
        layouts.positions(8, "spiral", 2)
    with pytest.raises(ValueError, match="stripe=2 applies only to layout='striped'"):
        layouts.permute(np.zeros((1, 8)), "zigzag", 2, stripe=2)
    with pytest.raises(ValueError, match="num_shards must be a positive integer"):
        layouts.positions(8, "contiguous", 0)


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_diagram_work_covers_every_causal_pair_once(layout):
    from lca.bench.figures import load_module

    diagrams = load_module("tools/layout_diagram.py")

    t, n = 32, 4
    steps = diagrams.step_of_pairs(t, layout, n)
    assert (steps >= 0).sum() == t * (t + 1) // 2
    work = diagrams.work_per_step(t, layout, n)
    assert work.sum() * (t // n) ** 2 == t * (t + 1) // 2
    # Zigzag's every rank does the same work at every step after the first.
    assert (np.ptp(work[1:], axis=1) == 0).all() == (layout == "zigzag")
