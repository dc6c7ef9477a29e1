"""SIGTERM / SIGINT / SIGHUP and the deadline alarm, turned into exceptions that unwind to a restore."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any, Optional

from bootstrap.errors import DeadlineExceeded, ReclaimError, Terminated

LOG = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupts:
    """Raises once, then stays quiet.

    The first signal raises in the main thread, so the `finally` that restores the routes runs. A second
    signal must not cut that restore short: after the first raise the handler only logs. The restore
    loop (see `reclaim.restore_until_done`) repeats a restore that an interrupt did cut short.
    """

    def __init__(self) -> None:
        self.armed = False
        self.received: Optional[str] = None
        self._seconds = 0.0
        self._previous: dict[int, Any] = {}

    def install(self, deadline_seconds: float) -> None:
        self.armed = True
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_alarm)
        # The alarm ends a call that blocks past the deadline (a hung API connection) as well.
        self._seconds = deadline_seconds
        signal.setitimer(signal.ITIMER_REAL, deadline_seconds)

    def uninstall(self) -> None:
        """Cancel the alarm and put the previous handlers back (the process may go on: tests, callers)."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.armed = False
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _raise(self, error: ReclaimError) -> None:
        self.received = str(error)
        if not self.armed:
            LOG.warning("%s: already stopping; restoring first", error)
            return
        self.armed = False
        raise error

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self._raise(Terminated(f"signal {signal.Signals(signum).name} received"))

    def _on_alarm(self, signum: int, frame: Optional[FrameType]) -> None:
        self._raise(DeadlineExceeded(f"deadline of {self._seconds:g} s passed"))
