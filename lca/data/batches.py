"""Deterministic, checkpointable batch iterators and the one layout permutation.

Batch `i` of a run is a pure function of (seed, i): the iterator's whole
state is the index of the next batch, saved beside the train state, so a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import numpy as np

from lca import layouts

SEQUENCE_FIELDS = ("tokens", "targets", "weights", "positions", "segment_ids")


def batch_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of batch `index` of stream `stream` (0 train, 1.. evaluation)."""
    return np.random.default_rng([int(seed), int(stream), int(index)])


class Batches:
    """`next(it)` -> dict of NumPy arrays [batch, seq_len] in natural token order.

    curriculum: ((length, steps), ...) stages run before the task's own
    length, shortest first: a needle is found far sooner in a short haystack,
    and what is learned there carries to long ones.
    """

    def __init__(self, task, batch_size: int, seed: int, stream: int = 0, index: int = 0,
                 curriculum: tuple = ()):
        self.task, self.batch_size, self.seed, self.stream = task, batch_size, seed, stream
        self.index, self.curriculum = index, tuple(curriculum)

    def length_at(self, index: int) -> int:
        """The sequence length of batch `index`."""
        for length, steps in self.curriculum:
            if index < steps:
                return int(length)
            index -= steps
        return self.task.seq_len

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.task.batch(batch_rng(self.seed, self.index, self.stream), self.batch_size,
                                seq_len=self.length_at(self.index))
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": int(self.index), "seed": int(self.seed), "stream": int(self.stream)}

    def set_state(self, state: dict) -> None:
        if int(state["seed"]) != self.seed or int(state["stream"]) != self.stream:
            raise ValueError(f"data iterator state {state} is for another seed or stream;"
                             f" this run has seed={self.seed}, stream={self.stream}")
        self.index = int(state["index"])


def to_layout(batch: dict, layout: str, num_shards: int) -> dict:
    """Natural order -> layout order for every [B, T] field; adds `positions` if missing.

    The single permutation of a run: tokens, targets, loss weights, positions
    and segment ids move together, so the model and the loss work in layout
    order. Other fields (such as `depth`) are left as they are.
    """
    out = dict(batch)
    b, t = batch["tokens"].shape
    if "positions" not in out:
        out["positions"] = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    for name in SEQUENCE_FIELDS:
        if name in out:
            out[name] = np.ascontiguousarray(layouts.permute(np.asarray(out[name]), layout,
                                                             num_shards, axis=1))
    return out


def from_layout(x, layout: str, num_shards: int, axis: int = 1):
    """Layout order -> natural order (for what a person looks at: predictions, maps)."""
    return layouts.unpermute(x, layout, num_shards, axis=axis)
