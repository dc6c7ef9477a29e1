"""Route-level faults of one run, through `main()` with the kernel-like fakes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest

from bootstrap.route_model import Route, Rule
from tests.unit.test_bootstrap_fakes import AL2023_TABLE, EIP, IFINDEX, SELF, FakeEc2, Rig, client_error


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp=tmp_path)


def test_a_pin_flushed_mid_detour_is_back_before_the_next_call(rig: Rig) -> None:
    imds_pin = "169.254.169.254/32"

    def pinned() -> bool:
        return any(r.dst == imds_pin for r in rig.netlink.table)

    def flush(op: str) -> None:
        seen.append(pinned())
        if len(seen) == 1:
            gone: Route = next(r for r in rig.netlink.table if r.dst == imds_pin)
            rig.netlink.delete(gone)

    seen: list[bool] = []
    rig.ec2.before_call = flush
    rig.ec2.errors["DescribeAddresses"] = [client_error("RequestLimitExceeded")]
    assert rig.main() == 0
    # Flushed during the first (throttled) call; every later call had the pin again.
    assert seen[0] and all(seen[1:]) and len(seen) > 2
    assert rig.netlink.table == AL2023_TABLE


LEFTOVER = replace(AL2023_TABLE[0], gateway="10.0.0.4")


def test_a_leftover_detour_without_a_journal_is_put_back_via_the_router(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.netlink.table = [LEFTOVER, *AL2023_TABLE[1:]]
    assert rig.main() == 0
    assert rig.netlink.table == AL2023_TABLE
    assert rig.ec2.address["InstanceId"] == SELF
    err = capsys.readouterr().err
    assert err.count("no journal accounts for") == 1, err


def test_a_leftover_detour_is_put_back_on_the_already_held_path_too(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.ec2 = FakeEc2(holder=SELF)
    rig.imds.identity_value = replace(rig.imds.identity_value, public_ipv4=EIP)
    rig.netlink.table = [LEFTOVER, *AL2023_TABLE[1:]]
    assert rig.main() == 0
    assert rig.netlink.table == AL2023_TABLE
    assert rig.ec2.calls == ["DescribeAddresses"]
    assert "no journal accounts for" in capsys.readouterr().err


def test_a_source_rule_ahead_of_main_stops_the_run_before_the_first_call(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    """amazon-ec2-net-utils' per-interface rule: the API connection would leave via the router."""
    rig.netlink.rule_list.append(Rule(10000, 10000, src="10.0.0.10/32"))
    theirs = Route(dst="0.0.0.0/0", gateway="10.0.0.1", oif=IFINDEX, table=10000)
    rig.netlink.table.append(theirs)
    rules_before = rig.netlink.rules()
    assert rig.main() == 75
    assert rig.ec2.calls == []
    assert rig.clock.slept == []
    assert rig.netlink.table == [*AL2023_TABLE, theirs]
    assert rig.netlink.rules() == rules_before
    err = capsys.readouterr().err
    assert "would leave via 10.0.0.1 (rule 10000: from 10.0.0.10 lookup 10000; route 0.0.0.0/0" in err


def test_a_bypass_that_appears_with_a_lease_renewal_is_caught_before_the_next_call(rig: Rig) -> None:
    def renew(op: str) -> None:
        if op == "DescribeInstances":
            rig.netlink.replace(AL2023_TABLE[0])
            rig.netlink.table.append(Route(dst="128.0.0.0/1", gateway="10.0.0.1", oif=IFINDEX))

    rig.ec2.before_call = renew
    assert rig.main() == 75
    assert rig.ec2.calls == ["DescribeAddresses", "DescribeInstances"]
    assert rig.netlink.table == [*AL2023_TABLE, Route(dst="128.0.0.0/1", gateway="10.0.0.1", oif=IFINDEX)]


def _renew_main_table(rig: Rig) -> None:
    """networkd's renewal: its DHCP default route replaces the detour (same metric)."""
    rig.netlink.replace(AL2023_TABLE[0])


def _renew_policy_route(rig: Rig) -> None:
    """networkd's reconfiguration: foreign rules are removed, the payload's with them."""
    ours = next(r for r in rig.netlink.rules() if r.fwmark)
    assert rig.netlink.delete_rule(ours)


def _renew_with_a_source_rule(rig: Rig) -> None:
    """A renewal that brings amazon-ec2-net-utils' source rule and table too."""
    _renew_main_table(rig)
    rig.netlink.rule_list.append(Rule(10000, 10000, src="10.0.0.10/32"))
    rig.netlink.table.append(Route(dst="0.0.0.0/0", gateway="10.0.0.1", oif=IFINDEX, table=10000))


def _race_the_first_path_check(rig: Rig, renew: Callable[[Rig], None]) -> list[str | None]:
    """Run `renew` just before the kernel is first asked for the API's path; return every answer's gateway."""
    route_get = rig.netlink.route_get
    asked: list[str | None] = []

    def racing(dst: str, src: str | None = None, mark: int | None = None) -> Any:
        if not asked:
            renew(rig)
        found = route_get(dst, src=src, mark=mark)
        asked.append(found.gateway)
        return found

    rig.netlink.route_get = racing  # type: ignore[method-assign]
    return asked


@pytest.mark.parametrize(
    ("egress", "renew", "logged"),
    [
        ("main-table", _renew_main_table, "were changed under the run (a lease renewal?); put back"),
        ("policy-route", _renew_policy_route, "had gone; put back"),
    ],
)
def test_a_renewal_between_the_change_and_the_first_path_check_is_repaired_not_taken_for_a_bypass(
    rig: Rig, egress: str, renew: Callable[[Rig], None], logged: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The race is not a bypass: the detour is put back and the kernel asked again (the run heals)."""
    asked = _race_the_first_path_check(rig, renew)
    assert rig.main(config=rig.config(egress=egress)) == 0
    assert asked[:2] == ["10.0.0.1", "10.0.0.4"]
    assert rig.ec2.address["InstanceId"] == SELF
    assert rig.netlink.table == AL2023_TABLE
    assert logged in capsys.readouterr().err


def test_a_bypass_that_survives_the_repair_still_stops_the_run(rig: Rig) -> None:
    """The repair puts the detour back, the source rule still wins: asked twice, then 75, no API call."""
    asked = _race_the_first_path_check(rig, _renew_with_a_source_rule)
    assert rig.main() == 75
    assert len(asked) == 2
    assert rig.ec2.calls == []


def test_a_pin_flushed_before_the_identity_guard_is_added_back_and_the_guard_asked_again(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    """A renewal that flushes the pins right after they were added: without the 169.254.169.254 pin IMDS
    answers through the NAT (another instance). The pin is put back and the guard passes the second time."""
    imds_pin = "169.254.169.254/32"
    flushed: list[Route] = []

    def instance_id() -> str:
        if not flushed:
            flushed.append(next(r for r in rig.netlink.table if r.dst == imds_pin))
            rig.netlink.delete(flushed[0])
        pinned = any(r.dst == imds_pin for r in rig.netlink.table)
        return SELF if pinned else "i-0natinstance00000"

    rig.imds.instance_id = instance_id  # type: ignore[method-assign]
    assert rig.main() == 0
    assert rig.ec2.address["InstanceId"] == SELF
    assert rig.netlink.table == AL2023_TABLE
    err = capsys.readouterr().err
    assert f"pin {imds_pin} via 10.0.0.1 dev index {IFINDEX} proto static metric 0 had vanished" in err
