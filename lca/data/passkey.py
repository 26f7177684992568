"""Passkey retrieval: a key hidden at a random depth in filler, asked for at the end.

Vocabulary (`vocab_size` >= 4 + 10 n + 10): 0 pad, 1 begin, 2 key marker,
3 question marker, then n places of ten digits (digit v in place i is token
4 + 10 i + v: a number's digits carry their place, as a tokenizer's number
pieces do), the rest filler words. As in the original passkey test, the
filler is one fixed sentence repeated ("The grass is green. The sky is
blue. ..."), so the key is the only thing that changes. A sequence of length T:

    [BOS] filler ... [KEY] d1 .. dn filler ... [ASK] d1 .. dn

The loss and the accuracy count only the answer: the [ASK] token predicts
d1, d1 predicts d2, and so on; a key is right only if all n digits are. Depth is where the key sits in the filler, 0 (start)
to 1 (just before the question). Every batch is a function of (seed, index).
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD, BOS, KEY, ASK, DIGIT0 = 0, 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class Passkey:
    seq_len: int
    key_len: int = 4
    vocab_size: int = 64

    def __post_init__(self):
        if self.key_len < 1:
            raise ValueError(f"passkey key_len must be >= 1; got {self.key_len}")
        if self.vocab_size < self.filler0 + 10:
            raise ValueError(f"passkey vocab_size must be >= {self.filler0 + 10} for key_len"
                             f" {self.key_len}; got {self.vocab_size}")
        if self.seq_len < 2 * self.key_len + 4:
            raise ValueError(
                f"passkey seq_len {self.seq_len} is too short for key_len {self.key_len};"
                f" need at least {2 * self.key_len + 4}")

    @property
    def filler0(self) -> int:
        return DIGIT0 + 10 * self.key_len

    @property
    def sentence(self) -> np.ndarray:
        """The filler sentence: 16 filler words, the same for every batch and seed."""
        words = np.random.default_rng(12345).permutation(self.vocab_size - self.filler0)
        return (words[:16] + self.filler0).astype(np.int32)

    def batch(self, rng: np.random.Generator, batch_size: int, seq_len: int | None = None,
              depth: np.ndarray | None = None) -> dict:
        """tokens, targets, weights [B, T]; depth [B] in [0, 1]."""
        t, n, b = seq_len or self.seq_len, self.key_len, batch_size
        tokens = np.broadcast_to(np.resize(self.sentence, t), (b, t)).astype(np.int32)
        tokens[:, 0] = BOS
        ask = t - n - 1
        # The key block [KEY] d1..dn starts anywhere in 1 .. ask - n - 1.
        last_start = ask - n - 1
        if depth is None:
            depth = rng.uniform(size=b)
        starts = 1 + np.round(np.asarray(depth) * (last_start - 1)).astype(np.int64)
        digits = (rng.integers(0, 10, size=(b, n)) + DIGIT0 + 10 * np.arange(n)).astype(np.int32)
        rows = np.arange(b)[:, None]
        tokens[np.arange(b), starts] = KEY
        tokens[rows, starts[:, None] + 1 + np.arange(n)] = digits
        tokens[:, ask] = ASK
        tokens[:, ask + 1:] = digits
        targets = np.concatenate([tokens[:, 1:], np.full((b, 1), PAD, np.int32)], axis=1)
        weights = np.zeros((b, t), np.float32)
        weights[:, ask:t - 1] = 1.0
        return {"tokens": tokens, "targets": targets, "weights": weights,
                "depth": ((starts - 1) / max(last_start - 1, 1)).astype(np.float32)}

    def score(self, predictions: np.ndarray, batch: dict):
        """(correct [B, 1], depth [B, 1]): a key counts only if all its digits are right."""
        w = batch["weights"] > 0
        right = np.where(w, predictions == batch["targets"], True).all(axis=1)
        return right[:, None].astype(np.float32), batch["depth"][:, None]
