"""A stop (SIGTERM) or the deadline while the payload is blocked inside an API call or a name lookup:
the restore starts within a second, the exit code is the contract's, and every table is as it was.

Blocked in connect: the NAT drops the SYN. Blocked in read: the API accepts and never answers (moto is
stopped). Blocked in a lookup: the endpoint is a name and the resolver never answers. Before the fix
the stop raised inside botocore was wrapped into HTTPClientError and retried: the run went on to its
deadline (and a lookup held the signal for glibc's whole timeout).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.kernel import world as lab
from tests.kernel.conftest import both_payloads
from tests.kernel.world import World

pytestmark = pytest.mark.root

# A stop must reach the restore within a second; the rest is the restore and the interpreter's exit.
STOP_LATENCY_LIMIT = 1.5


@contextmanager
def _syn_dropped(w: World) -> Iterator[None]:
    rule = ["INPUT", "-d", lab.API, "-p", "tcp", "--dport", "80", "-j", "DROP"]
    w.nat.run("iptables", "-I", *rule)
    try:
        yield
    finally:
        w.nat.run("iptables", "-D", *rule, check=False)


@contextmanager
def _api_silent(w: World) -> Iterator[None]:
    w.pause_api()
    try:
        yield
    finally:
        w.resume_api()


@contextmanager
def _resolver_silent(w: World) -> Iterator[None]:
    # `ip netns exec` mounts /etc/netns/<name>/resolv.conf over /etc/resolv.conf for that namespace only.
    # The resolver is the VPC router, which drops every query (no ICMP error to end the wait early).
    directory = Path("/etc/netns") / w.inst.name
    rule = ["INPUT", "-p", "udp", "--dport", "53", "-j", "DROP"]
    try:
        directory.mkdir(parents=True)
        (directory / "resolv.conf").write_text(f"nameserver {lab.ROUTER}\noptions timeout:5 attempts:2\n")
        w.router.run("iptables", "-I", *rule)
        yield
    finally:
        w.router.run("iptables", "-D", *rule, check=False)
        shutil.rmtree(directory, ignore_errors=True)
        # /etc/netns itself only if this test made it and nothing else is in it.
        with contextlib.suppress(OSError):
            directory.parent.rmdir()


BLOCKS = {"connect": _syn_dropped, "read": _api_silent, "lookup": _resolver_silent}


def _config(w: World, block: str, **overrides: object) -> Path:
    if block == "lookup":
        overrides.setdefault("ec2_endpoint_url", "http://ec2.lab.invalid")
    return w.config(**overrides)


def _assert_restored(w: World, before: object, code: int, err: str) -> None:
    assert code == 75, err
    assert w.all_routes() == before, err
    assert not w.journal.exists(), err


@both_payloads
@pytest.mark.parametrize("block", list(BLOCKS))
def test_sigterm_while_blocked_in_a_call_restores_at_once(w: World, block: str) -> None:
    before = w.all_routes()
    with BLOCKS[block](w):
        proc = w.start_payload(_config(w, block))
        if block == "lookup":
            # The API's name is resolved before any route changes (the path check needs its address).
            time.sleep(1.0)
        else:
            w.wait_for_detour()
            time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - stopped
    print(f"blocked in {block}: SIGTERM to exit {took:.2f} s")
    _assert_restored(w, before, proc.returncode, err)
    assert "signal SIGTERM received" in err
    assert "retry" not in err, err
    assert took < STOP_LATENCY_LIMIT, err


@pytest.mark.parametrize("block", list(BLOCKS))
def test_the_deadline_while_blocked_in_a_call_restores_at_once(w: World, block: str) -> None:
    before = w.all_routes()
    with BLOCKS[block](w):
        started = time.monotonic()
        code, _, err = w.run_payload(_config(w, block, deadline_seconds=3))
        took = time.monotonic() - started
    print(f"blocked in {block}: deadline 3 s, exit after {took:.2f} s")
    _assert_restored(w, before, code, err)
    assert "deadline of 3 s passed" in err
    assert took < 3 + STOP_LATENCY_LIMIT, err
