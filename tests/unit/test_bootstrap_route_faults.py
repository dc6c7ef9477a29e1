"""Route-level faults of one run (issue 8), through `main()` with the kernel-like fakes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bootstrap.routes import Route, Rule
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
