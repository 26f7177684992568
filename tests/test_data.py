"""Data: deterministic synthetic tasks, the stdlib byte corpus, iterator state, the layout step."""

import numpy as np
import pytest

from lca.data import Batches, Passkey, Recall, StdlibText, batch_rng, from_layout, to_layout
from lca.data import passkey as passkey_lib


def test_passkey_hides_the_key_at_its_depth_and_asks_for_it_at_the_end():
    task = Passkey(seq_len=64, key_len=4, vocab_size=64)
    b = task.batch(batch_rng(0, 0), 8, depth=np.linspace(0, 1, 8))
    for row in range(8):
        tokens = b["tokens"][row]
        (start,) = np.nonzero(tokens == passkey_lib.KEY)[0]
        key = tokens[start + 1:start + 5]
        np.testing.assert_array_equal(tokens[-5:], np.r_[passkey_lib.ASK, key])
        # place i of the key uses digits 4 + 10 i .. 4 + 10 i + 9
        assert np.all((key - 4) // 10 == np.arange(4))
        assert np.all(tokens[np.r_[1:start, start + 5:59]] >= task.filler0)
        # the answer and only the answer is scored: ASK predicts d1, ..., d3 predicts d4
        np.testing.assert_array_equal(np.nonzero(b["weights"][row])[0], np.arange(59, 63))
        np.testing.assert_array_equal(b["targets"][row][59:63], key)
    assert b["depth"][0] == 0 and b["depth"][-1] == 1
    assert np.all(np.diff(np.nonzero(b["tokens"] == passkey_lib.KEY)[1]) > 0)


def test_batches_are_a_function_of_seed_and_index():
    task = Recall(seq_len=64, num_pairs=8, num_queries=4, vocab_size=32)
    a, b = Batches(task, 4, seed=3), Batches(task, 4, seed=3)
    first = [next(a)["tokens"] for _ in range(3)]
    b.set_state({"index": 2, "seed": 3, "stream": 0})
    np.testing.assert_array_equal(next(b)["tokens"], first[2])
    assert not np.array_equal(first[0], first[1])
    assert a.get_state() == {"index": 3, "seed": 3, "stream": 0}
    with pytest.raises(ValueError, match="another seed"):
        b.set_state({"index": 0, "seed": 4, "stream": 0})


def test_recall_asks_for_keys_it_showed():
    task = Recall(seq_len=48, num_pairs=8, num_queries=4, vocab_size=32)
    b = task.batch(batch_rng(0, 1), 4)
    for row in range(4):
        t = b["tokens"][row]
        pairs = dict(zip(t[1:17:2], t[2:17:2]))
        for k, v in zip(t[40::2], t[41::2]):
            assert pairs[k] == v
    right, depth = task.score(b["targets"], b)
    assert right.shape == depth.shape == (4, 4) and right.all()


def test_stdlib_corpus_splits_by_file_and_packs_documents_with_segments():
    train = StdlibText(256, split="train", max_bytes=300_000)
    val = StdlibText(256, split="validation", max_bytes=300_000)
    (data, docs), (vdata, vdocs) = train.arrays(), val.arrays()
    assert not set(np.unique(docs)) & set(np.unique(vdocs))   # no file in both
    b = train.batch(batch_rng(0, 0), 4, indices=np.arange(4))
    np.testing.assert_array_equal(b["tokens"][0], data[:256])
    seg, pos, w = b["segment_ids"], b["positions"], b["weights"]
    new_doc = np.diff(seg, axis=1) != 0
    # positions restart at each document; no loss where the next byte is another document
    assert np.all(pos[:, 1:][new_doc] == 0)
    assert np.all(w[:, :-1][new_doc] == 0) and w.mean() > 0.9
    again = StdlibText(256, split="train", max_bytes=300_000).batch(batch_rng(0, 0), 4)
    np.testing.assert_array_equal(again["tokens"], train.batch(batch_rng(0, 0), 4)["tokens"])


@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
def test_to_layout_moves_every_sequence_field_together(layout):
    b = StdlibText(64, max_bytes=100_000).batch(batch_rng(0, 0), 2)
    out = to_layout(b, layout, 4)
    for name in ("tokens", "targets", "weights", "positions", "segment_ids"):
        np.testing.assert_array_equal(from_layout(out[name], layout, 4), b[name])
    p = to_layout(Passkey(64, 2, 64).batch(batch_rng(0, 0), 2), layout, 4)
    np.testing.assert_array_equal(from_layout(p["positions"], layout, 4)[0], np.arange(64))


def test_curriculum_lengths_are_a_function_of_the_batch_index():
    it = Batches(Passkey(256, 2, 64), 2, seed=0, curriculum=((64, 2), (128, 1)))
    assert [next(it)["tokens"].shape[1] for _ in range(5)] == [64, 64, 128, 256, 256]
    it.set_state({"index": 2, "seed": 0, "stream": 0})
    assert next(it)["tokens"].shape[1] == 128
