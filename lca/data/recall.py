"""Multi-query associative recall (MQAR): key-value pairs first, then queries for them.

Vocabulary (`vocab_size` >= 2 * num_pairs_max + 2): 0 pad, 1 begin, keys in
the lower half of the rest, values in the upper half. A sequence of length T:

    [BOS] k1 v1 k2 v2 .. kp vp  filler(pad) ..  kq1 vq1  kq2 vq2 ..

The last 2 * queries tokens ask for keys drawn without repetition from the
pairs; each asked key predicts its value. Depth of a query is where its pair
sits in the prefix (0 first pair, 1 last pair).
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD, BOS = 0, 1


@dataclasses.dataclass(frozen=True)
class Recall:
    seq_len: int
    num_pairs: int = 16
    num_queries: int = 8
    vocab_size: int = 128

    def __post_init__(self):
        half = (self.vocab_size - 2) // 2
        if self.num_pairs > half:
            raise ValueError(f"recall num_pairs {self.num_pairs} needs vocab_size >="
                             f" {2 * self.num_pairs + 2}; got {self.vocab_size}")
        if self.num_queries > self.num_pairs:
            raise ValueError(f"recall num_queries {self.num_queries} > num_pairs {self.num_pairs}")
        if self.seq_len < 1 + 2 * self.num_pairs + 2 * self.num_queries:
            raise ValueError(f"recall seq_len {self.seq_len} too short for"
                             f" {self.num_pairs} pairs and {self.num_queries} queries")

    def batch(self, rng: np.random.Generator, batch_size: int, seq_len: int | None = None,
              depth=None) -> dict:
        t, p, q, b = seq_len or self.seq_len, self.num_pairs, self.num_queries, batch_size
        half = (self.vocab_size - 2) // 2
        keys = np.argsort(rng.uniform(size=(b, half)), axis=1)[:, :p] + 2
        values = rng.integers(2 + half, 2 + 2 * half, size=(b, p))
        tokens = np.zeros((b, t), np.int32)
        tokens[:, 0] = BOS
        tokens[:, 1:1 + 2 * p:2] = keys
        tokens[:, 2:2 + 2 * p:2] = values
        asked = np.argsort(rng.uniform(size=(b, p)), axis=1)[:, :q]
        rows = np.arange(b)[:, None]
        start = t - 2 * q
        tokens[:, start::2] = keys[rows, asked]
        tokens[:, start + 1::2] = values[rows, asked]
        targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
        weights = np.zeros((b, t), np.float32)
        weights[:, start::2] = 1.0
        return {"tokens": tokens, "targets": targets, "weights": weights,
                "depth": (asked / max(p - 1, 1)).astype(np.float32)}

    def score(self, predictions: np.ndarray, batch: dict):
        """(correct [B, queries], depth [B, queries]), one item per query."""
        t, q = batch["tokens"].shape[1], self.num_queries
        cols = np.arange(t - 2 * q, t, 2)
        right = predictions[:, cols] == batch["targets"][:, cols]
        return right.astype(np.float32), batch["depth"]
