"""The default egress, policy-route, against the real kernel: only the payload's marked API connections
take the NAT, the main table is never written (sampled from outside during the run), and rules and
tables are as they were after success, failure, the deadline, SIGTERM and SIGKILL plus a rerun.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel import world as lab
from tests.kernel.conftest import both_payloads
from tests.kernel.world import World

pytestmark = pytest.mark.root

TABLE = "57776"


def _policy(w: World, **overrides: Any) -> Path:
    return w.config(egress="policy-route", **overrides)


def _rules(w: World) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = json.loads(w.inst.ip("-j", "rule", "show") or "[]")
    return rules


def _state(w: World) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return w.all_routes(), _rules(w)


@contextlib.contextmanager
def _sampling_main(w: World) -> Iterator[list[list[dict[str, Any]]]]:
    """The main table as seen from outside, every 10 ms, while the block runs."""
    samples: list[list[dict[str, Any]]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(w.routes("main"))
            stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(5)


@both_payloads
def test_policy_route_takes_the_address_and_never_writes_the_main_table(w: World) -> None:
    before = _state(w)
    main = w.routes("main")
    saw_rule: list[bool] = []
    with _sampling_main(w) as samples:
        proc = w.start_payload(_policy(w))
        while proc.poll() is None:
            saw_rule.append(any(r.get("table") == TABLE for r in _rules(w)))
            time.sleep(0.01)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert w.holder() == w.ids["self"]
    assert samples and all(s == main for s in samples), "the main table changed during the run"
    assert any(saw_rule), "the policy rule was never seen in place"
    assert _state(w) == before
    assert not w.journal.exists()
    print(f"main table sampled {len(samples)} times during the run: never changed")


@both_payloads
def test_policy_route_with_a_source_rule_ahead_of_main_still_reaches_the_nat(w: World) -> None:
    # amazon-ec2-net-utils style: a per-interface table that would send everything via the router.
    w.inst.ip("route", "add", "default", "via", lab.ROUTER, "dev", lab.IFNAME, "table", "10000")
    w.inst.ip("rule", "add", "from", lab.ADDRESS, "lookup", "10000", "pref", "10000")
    before = _state(w)
    code, _, err = w.run_payload(_policy(w))
    assert code == 0, err
    assert w.holder() == w.ids["self"]
    assert _state(w) == before


def test_policy_route_api_failure_and_deadline_leave_rules_and_tables_as_they_were(w: World) -> None:
    before = _state(w)
    code, _, err = w.run_payload(_policy(w, allocation_id="eipalloc-0123456789abcdef0"))
    assert code == 3, err
    assert _state(w) == before
    w.pause_api()
    try:
        code, _, err = w.run_payload(_policy(w, deadline_seconds=2))
    finally:
        w.resume_api()
    assert code == 75, err
    assert _state(w) == before
    assert not w.journal.exists()


def test_policy_route_sigterm_at_random_moments_and_sigkill_then_a_rerun(w: World) -> None:
    rng = random.Random(20261130)
    before = _state(w)
    for _ in range(6):
        w.seed("associate", w.ids["allocation_id"], w.ids["other"])
        proc = w.start_payload(_policy(w))
        time.sleep(rng.uniform(0.05, 0.7))
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=40)
        verified = "ec2: verified" in err
        assert proc.returncode in (0, 75, -signal.SIGTERM), err
        assert proc.returncode != 0 or verified, err
        assert _state(w) == before, err
    # SIGKILL while the rule is in place: it stays (matching nothing), and the next run removes it.
    w.seed("associate", w.ids["allocation_id"], w.ids["other"])
    w.pause_api()
    proc = w.start_payload(_policy(w))
    try:
        give_up = time.monotonic() + 15
        while not any(r.get("table") == TABLE for r in _rules(w)):
            assert time.monotonic() < give_up, "the policy rule never appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        w.resume_api()
    assert _state(w) != before and w.journal.exists()
    code, _, err = w.run_payload(_policy(w))
    assert code == 0, err
    assert "recover: a previous run left rule 100 and table 57776" in err
    assert _state(w) == before


@both_payloads
def test_policy_route_removes_only_its_own_routes_from_its_table(w: World) -> None:
    """Another's route in table 57776 survives a run, and a SIGKILL then the rerun that recovers: only
    routes with the payload's protocol (225) are its own."""
    w.inst.ip("route", "add", "10.99.0.0/16", "via", lab.ROUTER, "dev", lab.IFNAME, "table", TABLE)
    before = _state(w)
    code, _, err = w.run_payload(_policy(w))
    assert code == 0, err
    assert _state(w) == before, err
    w.seed("associate", w.ids["allocation_id"], w.ids["other"])
    w.pause_api()
    proc = w.start_payload(_policy(w))
    try:
        give_up = time.monotonic() + 15
        while not any(r.get("table") == TABLE for r in _rules(w)):
            assert time.monotonic() < give_up, "the policy rule never appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        w.resume_api()
    protocols = {r["dst"]: str(r.get("protocol")) for r in w.routes(TABLE)}
    assert protocols == {"10.99.0.0/16": "boot", "default": "225"}, protocols
    code, _, err = w.run_payload(_policy(w))
    assert code == 0, err
    assert "recover: a previous run left rule 100 and table 57776" in err
    assert _state(w) == before, err


def test_policy_route_while_networkd_churns_the_main_table(w: World) -> None:
    """A lease renewal rewrites the main table's routes during the claim: the detour does not care."""
    before = _state(w)
    stop = threading.Event()
    default = f"default via {lab.ROUTER} dev {lab.IFNAME} proto dhcp src {lab.ADDRESS} metric 512".split()

    def churn() -> None:
        while not stop.is_set():
            w.inst.run("ip", "route", "replace", *default, check=False)
            w.inst.run("ip", "route", "append", *default, check=False)
            w.inst.run("ip", "route", "del", *default, check=False)
            w.inst.run("ip", "route", "replace", *default, check=False)
            stop.wait(0.02)

    thread = threading.Thread(target=churn, daemon=True)
    w.pause_api()
    proc = w.start_payload(_policy(w))
    thread.start()
    try:
        time.sleep(1.0)
        w.resume_api()
        _, err = proc.communicate(timeout=60)
    finally:
        stop.set()
        thread.join(10)
        w.resume_api()
    assert proc.returncode == 0, err
    assert w.holder() == w.ids["self"]
    assert _state(w) == before, err


def test_the_mark_is_what_takes_the_nat(w: World) -> None:
    """Unmarked traffic of other processes keeps the router while the rule is in place."""
    w.pause_api()
    proc = w.start_payload(_policy(w))
    try:
        give_up = time.monotonic() + 15
        while not any(r.get("table") == TABLE for r in _rules(w)):
            assert time.monotonic() < give_up
            time.sleep(0.02)
        unmarked = json.loads(w.inst.ip("-j", "route", "get", lab.API))[0]
        marked = json.loads(w.inst.ip("-j", "route", "get", lab.API, "mark", "0xe1b0"))[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        w.resume_api()
        proc.communicate(timeout=30)
    assert unmarked["gateway"] == lab.ROUTER
    assert marked["gateway"] == lab.NAT


@both_payloads
def test_direct_changes_nothing_on_the_host(w: World) -> None:
    """Egress direct (IPv6, interface endpoints): the API is reachable as routed, and nothing changes.

    Here the instance's own default route reaches the API (via the NAT namespace, standing in for a
    path that needs no detour; IMDS stays on the router, as EC2's hypervisor answers it on any route);
    the run must take the address without one route or rule changing.
    """
    w.inst.ip("route", "add", "169.254.169.254", "via", lab.ROUTER, "dev", lab.IFNAME)
    w.inst.ip(
        "route",
        "replace",
        "default",
        "via",
        lab.NAT,
        "dev",
        lab.IFNAME,
        "proto",
        "dhcp",
        "src",
        lab.ADDRESS,
        "metric",
        "512",
    )
    before = _state(w)
    with _sampling_main(w) as samples:
        code, _, err = w.run_payload(w.config(egress="direct", nat_by_subnet=None))
    assert code == 0, err
    assert w.holder() == w.ids["self"]
    assert _state(w) == before
    assert samples and all(s == before[0] or s == w.routes("main") for s in samples)
    assert "egress direct; no route change" in err
    assert not w.journal.exists()
