"""The run's clock and its one deadline, injectable so tests need not wait."""

from __future__ import annotations

import time
from typing import Optional, Protocol

from bootstrap.errors import DeadlineExceeded
from bootstrap.interrupts import interruptible


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    def uptime(self) -> float:
        """Seconds since the host booted: how far into the launch lifecycle hook's window this run is."""
        ...


class SystemClock:
    def __init__(self, uptime_at_start: Optional[float] = None) -> None:
        # Tests on a long-running host pretend a boot this many seconds ago (EIP_RECLAIM_TEST_UPTIME).
        self._pretend = None if uptime_at_start is None else (uptime_at_start, time.monotonic())

    def monotonic(self) -> float:
        return time.monotonic()

    def uptime(self) -> float:
        if self._pretend is not None:
            start_uptime, started = self._pretend
            return start_uptime + time.monotonic() - started
        # CLOCK_BOOTTIME counts from boot and, unlike CLOCK_MONOTONIC, through suspend.
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Deadline:
    """One deadline for the whole run, on the monotonic clock."""

    def __init__(self, clock: Clock, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds
        self.start = clock.monotonic()
        self.end = self.start + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - self.clock.monotonic())

    def elapsed(self) -> float:
        return self.clock.monotonic() - self.start

    def check(self, doing: str) -> None:
        """Raise DeadlineExceeded if the deadline has passed, naming what was about to happen."""
        if self.clock.monotonic() >= self.end:
            raise DeadlineExceeded(f"deadline of {self.seconds:g} s passed before {doing}")

    def timeout(self, limit: float) -> float:
        """`limit`, shortened so a blocking call cannot outlive the deadline (never zero: 10 ms floor)."""
        return max(0.01, min(limit, self.remaining()))

    def sleep(self, seconds: float, doing: str) -> None:
        """Sleep `seconds`, or fail now if that would pass the deadline."""
        if seconds >= self.remaining():
            raise DeadlineExceeded(f"deadline of {self.seconds:g} s would pass while {doing}")
        with interruptible():
            self.clock.sleep(seconds)
