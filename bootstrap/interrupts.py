"""SIGTERM / SIGINT / SIGHUP and the deadline alarm, turned into exceptions only where that is safe.

A signal handler that raises runs "between two bytecodes" of whatever the main thread is doing. Raised
inside pyroute2's asyncio transport it kills the netlink socket (the restore that follows would then
hang), and raised in the first instruction of a `finally` it would skip the restore itself. So the
handler raises only inside `interruptible()` regions — the blocking waits: IMDS and API requests,
backoff sleeps, waiting for the preload thread — all of which sit inside the detour's `try`. A signal
that arrives anywhere else is kept and raised at the next region's start; one that arrives after the
run is disarmed (the restore, the lifecycle call) is only logged. Each arming raises at most once.

Inside a region the handler raises `Interrupt`, a BaseException: libraries turn any `Exception` raised
in their I/O into one of their own (botocore wraps it in HTTPClientError, which reads as a transient
network error and would be retried), but let a BaseException through. The region's exit turns it back
into the ReclaimError it carries, so the stop reaches the run's `finally` within the signal's latency.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import FrameType
from typing import Any, Optional

from bootstrap.errors import DeadlineExceeded, ReclaimError, Terminated

LOG = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupt(BaseException):
    """A stop request carried through library code that swallows `Exception`; see the module docstring."""

    def __init__(self, error: ReclaimError) -> None:
        super().__init__(str(error))
        self.error = error


class Interrupts:
    """The process's stop signals and deadline alarm (one instance: `INTERRUPTS`)."""

    def __init__(self) -> None:
        self.armed = False
        self.received: Optional[str] = None
        self.pending: Optional[ReclaimError] = None
        self.depth = 0
        self._seconds = 0.0
        self._previous: dict[int, Any] = {}

    def install(self, deadline_seconds: float) -> None:
        self.armed = True
        self.pending = None
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_alarm)
        # The alarm also ends a call that blocks past the deadline (a hung API connection).
        self._seconds = deadline_seconds
        signal.setitimer(signal.ITIMER_REAL, deadline_seconds)

    def uninstall(self, *, restore_handlers: bool = True) -> None:
        """Cancel the alarm and disarm; put the previous handlers back unless the process is ending.

        A process that is about to exit keeps the (now logging-only) handlers: a SIGTERM that arrives
        between the end of the run and the exit is then logged instead of ending the process with the
        signal, so the exit code still tells what the run did.
        """
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.disarm()
        if restore_handlers:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous.clear()

    def disarm(self) -> None:
        """From here on signals are only logged: the restore and the lifecycle call run to the end."""
        self.armed = False
        self.pending = None

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A blocking wait that a stop signal or the deadline may cut short."""
        if self.armed and self.pending is not None:
            error, self.pending = self.pending, None
            self.armed = False
            raise error
        self.depth += 1
        try:
            yield
        except Interrupt as stop:
            if self.depth > 1:
                raise  # a region inside library code (a name lookup): the outermost one converts it
            raise stop.error from None
        finally:
            self.depth -= 1

    def _raise(self, error: ReclaimError) -> None:
        self.received = str(error)
        if not self.armed:
            LOG.warning("%s: already finishing; the routes are being restored or are restored", error)
            return
        if self.depth == 0:
            LOG.debug("%s: raised when the current step ends", error)
            self.pending = error
            return
        self.armed = False
        self.pending = None
        raise Interrupt(error)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self._raise(Terminated(f"signal {signal.Signals(signum).name} received"))

    def _on_alarm(self, signum: int, frame: Optional[FrameType]) -> None:
        self._raise(DeadlineExceeded(f"deadline of {self._seconds:g} s passed"))


# Signal handlers belong to the process, so there is one of these.
INTERRUPTS = Interrupts()


def interruptible() -> AbstractContextManager[None]:
    """`with interruptible():` around a blocking wait (see the module docstring)."""
    return INTERRUPTS.interruptible()
