"""Metrics as JSON lines (`metrics.jsonl`) and TensorBoard event files (`tb/`) in the workdir."""

from __future__ import annotations

import json
import os


class MetricsWriter:
    """`write(step, {"train/loss": 1.2, ...})` appends one JSON line and TensorBoard scalars."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tb")
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional at import time)
            self._tb = SummaryWriter(self.tb_dir)

    def write(self, step: int, scalars: dict) -> None:
        values = {k: float(v) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read(workdir: str) -> list[dict]:
    """Every record of `metrics.jsonl`; a resumed run's later records win for a step."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
