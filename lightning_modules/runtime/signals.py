"""SIGTERM / SIGINT during training: finish the current step, write a checkpoint, exit non-zero.

A cluster scheduler sends SIGTERM before killing a job; Ctrl+C sends SIGINT. `StopSignals` replaces
the handlers from `on_train_start` (after Lightning registered its own; Lightning's teardown puts
back the pre-fit handlers on every exit path) with ones that only set a flag; the module checks it at the
end of every training batch, on every rank (any rank's signal counts), saves a checkpoint and raises
`TrainingInterrupted`, a `SystemExit` with code 128 + signal number (143 for SIGTERM, 130 for
SIGINT), so the scheduler records a failure. A second Ctrl+C interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class TrainingInterrupted(SystemExit):
    """Raised after the interrupt checkpoint is written; its exit code is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: str):
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint


class StopSignals:
    """Installs flag-setting SIGTERM / SIGINT handlers (main thread only) and restores the previous ones."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now
        self.received = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for signum in self.SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
