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

The region's own way in and out is not the blocking wait: an `Interrupt` raised there (after the call
returned, before the exit's conversion) would escape every handler and end the process with a
traceback. The handler sees the frame the signal lands in; in the region's entry or exit it only keeps
the stop, and the entry's or the exit's last step raises it as the ReclaimError.
"""

from __future__ import annotations

import logging
import signal
from contextlib import AbstractContextManager
from types import FrameType
from typing import Any, NoReturn, Optional

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

    def interruptible(self) -> AbstractContextManager[None]:
        """A blocking wait that a stop signal or the deadline may cut short."""
        return _Region(self)

    def _stop(self, error: ReclaimError) -> NoReturn:
        """Raise `error` now: as an `Interrupt` while an outer region still has to convert it."""
        self.armed = False
        self.pending = None
        if self.depth > 0:
            raise Interrupt(error)
        raise error

    def _raise(self, error: ReclaimError, frame: Optional[FrameType]) -> None:
        self.received = str(error)
        if not self.armed:
            LOG.warning("%s: already finishing; the routes are being restored or are restored", error)
            return
        if self.depth == 0 or (frame is not None and frame.f_code in _REGION_CODE):
            # Outside a region, or on a region's own way in or out, where an exception raised here would
            # escape the conversion: kept, and raised by the region's exit or the next region's entry.
            LOG.debug("%s: raised when the current step ends", error)
            self.pending = error
            return
        self._stop(error)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self._raise(Terminated(f"signal {signal.Signals(signum).name} received"), frame)

    def _on_alarm(self, signum: int, frame: Optional[FrameType]) -> None:
        self._raise(DeadlineExceeded(f"deadline of {self._seconds:g} s passed"), frame)


class _Region:
    """One `with interruptible():`. Its entry and exit are plain methods, not a generator, so that the
    handler can tell them by their code (`_REGION_CODE`): a stop that lands in them is kept as pending
    and raised here as a plain exception at the end of the entry or the exit, never in mid-step.
    """

    __slots__ = ("_owner",)

    def __init__(self, owner: Interrupts) -> None:
        self._owner = owner

    def __enter__(self) -> None:
        owner = self._owner
        owner.depth += 1
        # Last: a stop kept from before the region, or one that landed on the line above.
        if owner.armed and owner.pending is not None:
            owner.depth -= 1
            owner._stop(owner.pending)

    def __exit__(
        self, kind: Optional[type[BaseException]], value: Optional[BaseException], traceback: Any
    ) -> None:
        owner = self._owner
        owner.depth -= 1
        if isinstance(value, Interrupt):
            if owner.depth > 0:
                return  # a region inside library code (a name lookup): the outermost one converts it
            raise value.error from None
        # Last: a stop that landed after the blocking call returned (or during it, in a region's code).
        if owner.armed and owner.pending is not None:
            owner._stop(owner.pending)


# The code of a region's own way in and out: a stop that lands there is kept, never raised in mid-step.
_REGION_CODE = frozenset({_Region.__enter__.__code__, _Region.__exit__.__code__})

# Signal handlers belong to the process, so there is one of these.
INTERRUPTS = Interrupts()


def interruptible() -> AbstractContextManager[None]:
    """`with interruptible():` around a blocking wait (see the module docstring)."""
    return INTERRUPTS.interruptible()
