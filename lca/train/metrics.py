"""Metrics as JSON lines (`metrics.jsonl`) and TensorBoard event files (`tb/`) in the workdir."""

from __future__ import annotations

import json
import os


class MetricsWriter:
    """`write(step, {"train/loss": 1.2, ...})` appends one JSON line and TensorBoard scalars.

    In a multi-process run only process 0 writes (`enabled` defaults to that);
    the others accept the same calls and write nothing.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tb")
        self._file = self._tb = None
        if enabled is None:
            import jax  # noqa: PLC0415
            enabled = jax.process_index() == 0
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional at import time)
            self._tb = SummaryWriter(self.tb_dir)

    def write(self, step: int, scalars: dict) -> None:
        if self._file is None:
            return
        values = {k: float(v) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._file is not None:
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
