"""The lab's SIGTERM handling (no root needed): only the process that built the lab tears it down."""

from __future__ import annotations

import os
import signal

import pytest

from tests.lab import vpc


def test_sigterm_unwinds_the_builder_but_a_forked_copy_exits_without_touching_the_lab() -> None:
    handler = vpc._unwind_in(os.getpid())
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGTERM, None)
    # What pyroute2's IPRoute(netns=...) helper is: a fork of the test process, stopped with SIGTERM.
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            handler(signal.SIGTERM, None)
        finally:
            os._exit(1)  # reached only if the handler unwound: the copied stack's teardown would run
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
