"""A real byte-level corpus without downloads: the running interpreter's standard library.

Every `*.py` file under `sysconfig.get_paths()["stdlib"]` (site-packages
excluded), sorted by relative path, goes to train or validation by a CRC of
that path, so the split is the same on every machine with the same Python.
Files are concatenated into one byte stream; sequence n is the window
[n T, n T + T] of it, with segment ids so that documents never attend across
each other, positions that restart at each document (RoPE), and a zero loss
weight where the next byte belongs to another document.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sysconfig
import zlib

import numpy as np

VOCAB_SIZE = 256


def stdlib_files(root: str | None = None) -> list[str]:
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return sorted(out, key=lambda p: os.path.relpath(p, root))


@functools.lru_cache(maxsize=4)
def _stream(split: str, validation_percent: int, max_bytes: int, root: str | None):
    root = root or sysconfig.get_paths()["stdlib"]
    chunks, doc_ids, total = [], [], 0
    for i, path in enumerate(stdlib_files(root)):
        held_out = zlib.crc32(os.path.relpath(path, root).encode()) % 100 < validation_percent
        if held_out != (split == "validation"):
            continue
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), np.uint8)
        if not len(data):
            continue
        chunks.append(data)
        doc_ids.append(np.full(len(data), i, np.int32))
        total += len(data)
        if max_bytes and total >= max_bytes:
            break
    if not chunks:
        raise ValueError(f"no standard library files found under {root!r} for split {split!r}")
    return np.concatenate(chunks), np.concatenate(doc_ids)


@dataclasses.dataclass(frozen=True)
class StdlibText:
    seq_len: int
    split: str = "train"
    validation_percent: int = 5
    max_bytes: int = 0            # 0 = the whole split
    root: str | None = None
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self):
        if self.split not in ("train", "validation"):
            raise ValueError(f"text split must be 'train' or 'validation'; got {self.split!r}")

    def arrays(self):
        return _stream(self.split, self.validation_percent, self.max_bytes, self.root)

    def num_sequences(self, seq_len: int | None = None) -> int:
        data, _ = self.arrays()
        return max((len(data) - 1) // (seq_len or self.seq_len), 1)

    def batch(self, rng: np.random.Generator, batch_size: int, seq_len: int | None = None,
              depth=None, indices=None) -> dict:
        """Random windows (or the windows `indices`) of the stream, packed with segment ids."""
        t = seq_len or self.seq_len
        data, docs = self.arrays()
        if indices is None:
            indices = rng.integers(0, self.num_sequences(t), size=batch_size)
        starts = np.asarray(indices)[:, None] * t + np.arange(t + 1)
        starts = np.minimum(starts, len(data) - 1)
        window, doc = data[starts].astype(np.int32), docs[starts]
        seg = doc[:, :-1] - doc[:, :1] + 1
        first = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
        idx = np.broadcast_to(np.arange(t), seg.shape)
        positions = idx - np.maximum.accumulate(np.where(first, idx, 0), axis=1)
        return {"tokens": window[:, :-1], "targets": window[:, 1:],
                "weights": (doc[:, 1:] == doc[:, :-1]).astype(np.float32),
                "positions": positions.astype(np.int32), "segment_ids": seg.astype(np.int32)}
