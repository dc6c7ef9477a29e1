"""Name lookups bounded in time and cut short by a stop: each one runs on a worker thread.

glibc's resolver resumes its wait after a signal, and Python runs a signal handler only once the C call
returns, so a lookup that hangs (a resolver that drops packets) would hold SIGTERM and the deadline for
the resolver's whole timeout and retries. Run on a daemon thread instead, the main thread waits on an
event, which a signal interrupts at once; a lookup still hanging is abandoned with its thread.
Answers are kept for the run: the API's address, looked up once before the detour, is used as it was.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bootstrap.interrupts import interruptible

LOG = logging.getLogger(__name__)

# The VPC resolver answers in milliseconds; glibc's own default would wait 5 s per try and server.
LOOKUP_TIMEOUT_SECONDS = 5.0

_Answer = list[tuple[Any, ...]]


class BoundedResolver:
    """A drop-in `socket.getaddrinfo` that runs each new lookup off the main thread, with a timeout."""

    def __init__(
        self, lookup: Callable[..., _Answer] = socket.getaddrinfo, timeout: float = LOOKUP_TIMEOUT_SECONDS
    ) -> None:
        self._lookup = lookup
        self._timeout = timeout
        self._answers: dict[tuple[Any, ...], _Answer] = {}

    def getaddrinfo(  # noqa: PLR0917 (socket.getaddrinfo's own signature)
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> _Answer:
        key = (host, port, family, type, proto, flags)
        if key in self._answers:
            return self._answers[key]
        result: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                result["answer"] = self._lookup(host, port, family, type, proto, flags)
            except OSError as err:
                result["error"] = err
            finally:
                done.set()

        threading.Thread(target=work, name=f"lookup {host}", daemon=True).start()
        with interruptible():
            finished = done.wait(self._timeout)
        if not finished:
            raise socket.gaierror(socket.EAI_AGAIN, f"lookup of {host} took over {self._timeout:g} s")
        if "error" in result:
            raise result["error"]
        self._answers[key] = result["answer"]
        return list(result["answer"])

    def ipv4(self, host: str, port: int = 443) -> str:
        """The first IPv4 address of `host` (an address is returned as it is)."""
        answer = self.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
        return str(answer[0][4][0])


@contextmanager
def installed(resolver: BoundedResolver) -> Iterator[BoundedResolver]:
    """Every lookup in this process (botocore's included) goes through `resolver` while inside."""
    original = socket.getaddrinfo
    socket.getaddrinfo = resolver.getaddrinfo
    try:
        yield resolver
    finally:
        socket.getaddrinfo = original
