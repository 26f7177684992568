"""Stop cleanly on SIGTERM / SIGINT: finish the step, checkpoint, exit 0.

A scheduler preempting a job sends SIGTERM (Ctrl-C sends SIGINT). The
handler only records the request; the loop asks `should_stop(step)` after
each step, and when it says yes saves a checkpoint, waits for the
asynchronous save and returns. A second signal of the same kind while the
first is being handled gets the default behaviour (SIGINT raises
KeyboardInterrupt, SIGTERM ends the process); the newest complete
checkpoint is then still the one to resume from.

In a multi-process run every process must stop at the same step (the save
is collective), so `should_stop` combines the processes' flags with one
small all-gather per step; a signal that reaches only some processes stops
them all.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Context manager: installs the handlers on enter, restores the old ones on exit.

    Handlers can only be installed from the main thread; elsewhere (a
    notebook's worker thread, say) the context does nothing and
    `should_stop` only sees `request()`.
    """

    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        # Back to the old handler, so that a second signal is not swallowed.
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        self.request(signal.Signals(signum).name)

    def request(self, reason: str = "request") -> None:
        """Asks the loop to stop after the current step (what the signal handler does)."""
        if self.signal_name is None:
            self.signal_name = reason

    def should_stop(self, step: int) -> bool:
        """True when any process was asked to stop; all processes call it at every step."""
        del step  # every process calls this at the same steps; the step is for readers
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils  # noqa: PLC0415
        flags = multihost_utils.process_allgather(np.array([local], np.int32))
        if np.any(flags) and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return bool(np.any(flags))


__all__ = ["Preemption", "SIGNALS"]
