"""The real payload against the real kernel: routes before == routes after, on every way a run can end."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.kernel import bundled as shipped
from tests.kernel import world as lab
from tests.kernel.conftest import both_payloads
from tests.kernel.world import World

pytestmark = pytest.mark.root


def test_the_bundle_runs_on_python_3_9_with_only_its_own_packages(bundle: shipped.Bundled) -> None:
    """What `bundle-py39` runs is the instance's interpreter and the bundle's pins, not this checkout's."""
    seen = bundle.probe()
    assert seen["implementation"] == "cpython"
    assert tuple(seen["version"][:2]) == shipped.INSTANCE_PYTHON, seen["version"]
    # -S: no site module, so no site-packages (the AMI's, or this venv's newer botocore) on the path.
    assert seen["no_site"] == 1
    assert not seen["site_imported"]
    assert not [p for p in seen["path"] if "site-packages" in p or "dist-packages" in p], seen["path"]
    for name, (file, _) in seen["modules"].items():
        assert Path(file).is_relative_to(bundle.path), f"{name} imported from {file}, not the bundle"
    pins = bundle.manifest["packages"]
    for name in ("botocore", "urllib3"):
        assert seen["modules"][name][1] == pins[name], name


def _by_dst(table: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    return {r["dst"]: r for r in table}


@both_payloads
def test_success_takes_the_address_and_leaves_every_table_as_it_was(w: World) -> None:
    before = w.all_routes()
    code, _, err = w.run_payload(w.config())
    assert code == 0, err
    # Every table (main, local, IPv6), every attribute: protocol, source, metric, scope, flags.
    assert w.all_routes() == before
    assert w.holder() == w.ids["self"]
    assert not w.journal.exists()
    assert "associating" in err
    # IMDSv2 only: every request carried a token the emulator had issued (it answers 401 otherwise).
    imds = [json.loads(line) for line in (w.tmp / "imds-router.log").read_text().splitlines()]
    assert imds and all(r["status"] in (200, 404) for r in imds)
    assert "fake-secret-never-logged" not in err and "fake-session-token-never-logged" not in err


def test_pins_and_detour_are_in_place_while_the_api_is_called(w: World) -> None:
    before = w.routes()
    w.pause_api()
    proc = w.start_payload(w.config())
    try:
        during = _by_dst(w.wait_for_detour())
        # The detour replaced the DHCP default route in place: same metric, protocol and source.
        assert during["default"]["gateway"] == lab.NAT
        assert during["default"]["metric"] == 512
        assert during["default"]["protocol"] == "dhcp"
        assert during["default"]["prefsrc"] == lab.ADDRESS
        assert [r for r in w.routes() if r["dst"] == "default"] == [during["default"]]
        for pin in ("169.254.169.254", "169.254.169.253", "169.254.169.123", lab.VPC_CIDR):
            assert during[pin]["gateway"] == lab.ROUTER, pin
            assert during[pin]["dev"] == lab.IFNAME, pin
        journal = json.loads(w.journal.read_text())
        assert journal["plan"]["default_routes"][0]["gateway"] == lab.ROUTER
    finally:
        w.resume_api()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert w.routes() == before


@both_payloads
def test_api_failure_restores_and_exits_3(w: World) -> None:
    before = w.all_routes()
    code, _, err = w.run_payload(w.config(allocation_id="eipalloc-0123456789abcdef0"))
    assert code == 3, err
    assert "InvalidAllocationID.NotFound" in err
    assert w.all_routes() == before
    assert not w.journal.exists()


def test_deadline_restores_and_exits_75(w: World) -> None:
    before = w.all_routes()
    w.pause_api()
    try:
        started = time.monotonic()
        code, _, err = w.run_payload(w.config(deadline_seconds=2))
        took = time.monotonic() - started
    finally:
        w.resume_api()
    assert code == 75, err
    assert "deadline" in err
    assert w.all_routes() == before
    assert w.holder() == w.ids["other"]
    print(f"deadline 2 s: the run ended after {took:.2f} s")


@both_payloads
def test_sigterm_mid_detour_restores_and_exits_75(w: World) -> None:
    before = w.all_routes()
    code, err = w.stop_mid_detour(w.config())
    assert code == 75, err
    assert "SIGTERM" in err
    assert w.all_routes() == before
    assert not w.journal.exists()


@both_payloads
def test_sigkill_mid_detour_is_restored_by_the_next_run(w: World) -> None:
    before = w.all_routes()
    w.kill_mid_detour(w.config())
    # Nothing can restore after SIGKILL: the detour and the journal are left behind.
    assert w.all_routes() != before
    assert w.journal.exists()
    code, _, err = w.run_payload(w.config())
    assert code == 0, err
    assert "recover:" in err
    assert w.all_routes() == before
    assert w.holder() == w.ids["self"]


def test_sigkill_then_a_run_that_fails_still_restores_the_first_detour(w: World) -> None:
    before = w.all_routes()
    w.kill_mid_detour(w.config())
    code, _, err = w.run_payload(w.config(allocation_id="eipalloc-0123456789abcdef0"))
    assert code == 3, err
    assert w.all_routes() == before


def test_an_existing_pin_is_left_alone(w: World) -> None:
    pin = f"169.254.169.123 via {lab.ROUTER} dev {lab.IFNAME} proto dhcp metric 512"
    w.inst.ip("route", "add", *pin.split())
    before = w.all_routes()
    w.pause_api()
    proc = w.start_payload(w.config())
    try:
        during = _by_dst(w.wait_for_detour())
        assert during["169.254.169.123"]["protocol"] == "dhcp"
        assert during["169.254.169.123"]["metric"] == 512
        assert "169.254.169.254" in during
    finally:
        w.resume_api()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert w.all_routes() == before
    assert "left alone: 169.254.169.123/32" in err


def test_a_lease_renewal_during_the_detour_is_undone_before_the_next_call(w: World) -> None:
    before = w.all_routes()
    w.pause_api()
    proc = w.start_payload(w.config())
    try:
        w.wait_for_detour()
        # What systemd-networkd does on a DHCP renewal: put its own default route back.
        w.inst.ip("route", "replace", *lab.AL2023_ROUTES[-1].split())
    finally:
        w.resume_api()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "the detour or its pins were changed under the run (a lease renewal?); put back" in err
    assert w.all_routes() == before
    assert w.holder() == w.ids["self"]


def test_missing_imds_pin_is_caught_by_the_identity_guard(w: World) -> None:
    before = w.all_routes()
    env = w.env(EIP_RECLAIM_TEST_SKIP_PINS="imds")
    code, _, err = w.run_payload(w.config(), env=env)
    assert code == 75, err
    assert "TEST ONLY" in err
    assert lab.NAT_INSTANCE_ID in err
    assert w.all_routes() == before
    assert w.holder() == w.ids["other"], "no AssociateAddress may be made with the NAT's identity"


def test_subnet_not_in_the_map_touches_no_route(w: World) -> None:
    before = w.all_routes()
    code, _, err = w.run_payload(w.config(nat_by_subnet={"subnet-0bbb": "10.0.1.4"}))
    assert code == 2, err
    assert "subnet-0aaa" in err
    assert w.all_routes() == before
    assert not w.journal.exists()


def test_dry_run_prints_the_plan_and_changes_nothing(w: World) -> None:
    before = w.all_routes()
    code, out, err = w.run_payload(w.config(), "--dry-run")
    assert code == 0, err
    assert "would add pin: 169.254.169.254/32" in out
    assert f"would replace the default route by: 0.0.0.0/0 via {lab.NAT}" in out
    assert w.all_routes() == before
    assert w.holder() == w.ids["other"]


def test_second_run_when_already_held_makes_no_change(w: World) -> None:
    code, _, err = w.run_payload(w.config())
    assert code == 0, err
    before = w.all_routes()
    code, _, err = w.run_payload(w.config())
    assert code == 0, err
    assert "already held by this instance; no change" in err
    assert w.all_routes() == before


def test_mtu_and_a_second_default_route_come_back_exactly(w: World) -> None:
    w.inst.ip("route", "replace", *f"{lab.AL2023_ROUTES[-1]} mtu 9001".split())
    w.inst.ip("route", "add", *f"default via {lab.ROUTER} dev {lab.IFNAME} proto static metric 1024".split())
    before = w.all_routes()
    w.pause_api()
    proc = w.start_payload(w.config())
    try:
        w.wait_for_detour()
        defaults = sorted(w.defaults(), key=lambda r: r["metric"])
        # Only the best route is detoured, keeping its MTU; the metric-1024 one is not touched.
        assert [(r["gateway"], r["metric"], r.get("metrics")) for r in defaults] == [
            (lab.NAT, 512, [{"mtu": 9001}]),
            (lab.ROUTER, 1024, None),
        ]
    finally:
        w.resume_api()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert w.all_routes() == before


def test_a_multipath_default_route_is_refused_and_left_as_it_is(w: World) -> None:
    w.inst.ip("route", "del", "default")
    w.inst.ip(
        "route",
        "add",
        *f"default proto dhcp metric 512 nexthop via {lab.ROUTER} dev {lab.IFNAME}".split(),
        *f"nexthop via {lab.NAT} dev {lab.IFNAME}".split(),
    )
    before = w.all_routes()
    code, _, err = w.run_payload(w.config())
    assert code == 75, err
    assert "RTA_MULTIPATH" in err
    assert w.all_routes() == before
    assert not w.journal.exists()


def test_sigterm_at_random_moments_never_leaves_a_route_changed(w: World) -> None:
    """A stop request may land anywhere: imports, IMDS, netlink calls, the API, the restore, the exit."""
    rng = random.Random(20261126)
    before = w.all_routes()
    outcomes = []
    for _ in range(12):
        w.seed("associate", w.ids["allocation_id"], w.ids["other"])
        proc = w.start_payload(w.config())
        time.sleep(rng.uniform(0.05, 0.7))
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=40)
        # 0: finished first; 75: stopped and restored; -SIGTERM: before the handlers were installed or
        # during the interpreter's exit (Python resets handlers then), both with the routes as they were.
        assert proc.returncode in (0, 75, -signal.SIGTERM), err
        # 0 only when the association was verified before the stop; a stop before that is never 0 (after
        # it, a stop is held until the exit, or ends the process with the signal as the interpreter exits).
        verified = "ec2: verified" in err
        assert proc.returncode != 0 or verified, err
        assert proc.returncode != 75 or not verified, err
        assert w.all_routes() == before, err
        assert not w.journal.exists(), err
        outcomes.append(proc.returncode)
    print(f"outcomes of 12 runs stopped at random moments: {sorted(outcomes)}")


def test_sigkill_at_random_moments_is_always_repaired_by_the_next_run(w: World) -> None:
    rng = random.Random(7)
    before = w.all_routes()
    for _ in range(6):
        w.seed("associate", w.ids["allocation_id"], w.ids["other"])
        proc = w.start_payload(w.config())
        time.sleep(rng.uniform(0.2, 0.6))
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=40)
        code, _, err = w.run_payload(w.config())
        assert code == 0, err
        assert w.all_routes() == before, err
        assert w.holder() == w.ids["self"]


def test_a_lease_renewal_that_appends_the_route_during_the_detour_is_undone(w: World) -> None:
    """systemd-networkd adds its routes with NLM_F_CREATE|NLM_F_APPEND: the original comes back *beside*
    the detour (same metric, second in the group), where a replace of it is refused with EEXIST."""
    before = w.all_routes()
    w.pause_api()
    proc = w.start_payload(w.config())
    try:
        w.wait_for_detour()
        # Past the re-assertion before the (paused) API call: the restore meets the appended original.
        time.sleep(1.0)
        w.inst.ip("route", "append", *lab.AL2023_ROUTES[-1].split())
        assert [r["gateway"] for r in w.defaults()] == [lab.NAT, lab.ROUTER]
    finally:
        w.resume_api()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert w.all_routes() == before
    assert not w.journal.exists()
    assert w.holder() == w.ids["self"]


def test_sigkill_after_the_original_was_appended_is_recovered_by_the_next_run(w: World) -> None:
    before = w.all_routes()

    def append_the_original() -> None:
        time.sleep(1.0)
        w.inst.ip("route", "append", *lab.AL2023_ROUTES[-1].split())

    w.kill_mid_detour(w.config(), before_kill=append_the_original)
    assert w.journal.exists()
    code, _, err = w.run_payload(w.config())
    assert code == 0, err
    assert "recover:" in err
    assert w.all_routes() == before
    assert not w.journal.exists()
    # A second restore has nothing left to do: the next run changes nothing it did not undo.
    code, _, err = w.run_payload(w.config())
    assert code == 0, err
    assert w.all_routes() == before


def test_two_default_routes_of_the_same_metric_come_back_in_their_order(w: World) -> None:
    w.inst.ip(
        "route", "append", *f"default via {lab.ROUTER} dev {lab.IFNAME} proto static metric 512".split()
    )
    before = w.all_routes()
    assert [r["protocol"] for r in w.defaults()] == ["dhcp", "static"]
    code, _, err = w.run_payload(w.config())
    assert code == 0, err
    assert w.all_routes() == before
    assert not w.journal.exists()
    assert w.holder() == w.ids["self"]
