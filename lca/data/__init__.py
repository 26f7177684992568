"""Synthetic long-context tasks, a byte-level stdlib corpus, iterators and the layout step."""

from lca.data.batches import Batches, batch_rng, from_layout, to_layout
from lca.data.passkey import Passkey
from lca.data.recall import Recall
from lca.data.text import StdlibText

TASKS = {"passkey": Passkey, "recall": Recall, "text": StdlibText}

__all__ = ["Batches", "batch_rng", "from_layout", "to_layout", "Passkey", "Recall",
           "StdlibText", "TASKS"]
