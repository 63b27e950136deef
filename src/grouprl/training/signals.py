"""Stop requests: SIGTERM, SIGINT and SIGHUP end a run after the current step, not during it.

Shared machines preempt jobs with SIGTERM; a terminal sends SIGINT (Ctrl-C) or SIGHUP (a
closed session). The first such signal only sets a flag: the loop finishes the step, writes
a checkpoint and returns. A second signal restores the default action and re-raises it, so
a user who means it exits at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopRequests:
    """Installs the handlers while entered (main thread only); `requested` names the signal."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._saved: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # the second one: die as the signal says, now
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
