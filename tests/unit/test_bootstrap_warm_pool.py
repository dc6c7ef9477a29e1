"""Why the instance boots (IMDS autoscaling/target-lifecycle-state) and who keeps the address when warm
pools and overlapping updates put two members of a group side by side.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bootstrap.egress.policy_route import TABLE
from tests.unit.test_bootstrap_fakes import AL2023_TABLE, OTHER, SELF, Rig

SIGNAL = {"stack": "EipReclaim-web", "resource": "GroupASG0123ABCD"}


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


@pytest.mark.parametrize("egress", ["policy-route", "main-table"])
def test_warming_for_the_pool_completes_the_action_through_the_detour_and_claims_nothing(
    rig: Rig, egress: str
) -> None:
    # aws-facts: facts-imds-target-lifecycle-state
    rig.imds.target_state = "Warmed:Stopped"
    gateways: list[Any] = []

    def where(result: str) -> None:
        # The way out at the moment of the call: the policy table, or the main table's default route.
        private = rig.netlink.routes(TABLE)
        main = next(r.gateway for r in rig.netlink.table if r.dst == "0.0.0.0/0" and r.table == 254)
        gateways.append(private[0].gateway if private else main)

    rig.autoscaling.before_call = where
    assert rig.main(config=rig.config(egress=egress, signal=SIGNAL)) == 0
    assert rig.ec2.calls == []  # the address is not touched
    assert rig.ec2.address["InstanceId"] == OTHER
    assert gateways == ["10.0.0.4"]  # through the NAT: a warming instance has no public address
    assert [c["LifecycleActionResult"] for c in rig.autoscaling.completed] == ["CONTINUE"]
    assert rig.cloudformation.calls == []  # the stack waits for the instance that takes the address
    assert rig.netlink.table == AL2023_TABLE


def test_leaving_the_pool_claims_and_completes_the_second_launch_action(rig: Rig) -> None:
    rig.imds.target_state = "Warmed:Stopped"
    assert rig.main() == 0
    rig.imds.target_state = "InService"  # started from the pool (a stop clears /run, not needed here)
    assert rig.main() == 0
    assert rig.ec2.address["InstanceId"] == SELF
    assert [c["LifecycleActionResult"] for c in rig.autoscaling.completed] == ["CONTINUE", "CONTINUE"]


@pytest.mark.parametrize("state", ["Terminated", "Standby", "Detached"])
def test_an_instance_on_its_way_out_does_not_claim(rig: Rig, state: str) -> None:
    # aws-facts: facts-imds-target-lifecycle-state
    rig.imds.target_state = state
    assert rig.main() == 0
    assert rig.ec2.calls == [] and rig.netlink.calls == [] and rig.autoscaling.completed == []


def test_no_lifecycle_state_in_imds_means_claim(rig: Rig) -> None:
    # aws-facts: facts-imds-target-lifecycle-state
    rig.imds.target_state = None  # not in a group, or an IMDS without the category
    assert rig.main() == 0
    assert rig.ec2.address["InstanceId"] == SELF


def _member(instance_id: str, launched: str, version: str | None) -> dict[str, Any]:
    tags = [{"Key": "aws:autoscaling:groupName", "Value": "svc-asg"}]
    if version is not None:
        tags.append({"Key": "aws:ec2launchtemplate:version", "Value": version})
    return {"InstanceId": instance_id, "LaunchTime": launched, "State": {"Name": "running"}, "Tags": tags}


@pytest.mark.parametrize(
    ("mine", "theirs", "i_take_it"),
    [
        # A pool instance (first launched long ago, template v3) started after the holder (v3): it is the
        # one Auto Scaling just put in service, and takes the address.
        (("2026-11-30T12:10:00Z", "3"), ("2026-11-30T12:05:00Z", "3"), True),
        # The same pool instance on the old template (v2), started while a v3 member serves: it yields.
        (("2026-11-30T12:10:00Z", "2"), ("2026-11-30T12:05:00Z", "3"), False),
        # A v3 member against a v2 holder that was started later: the newer template wins.
        (("2026-11-30T12:05:00Z", "3"), ("2026-11-30T12:10:00Z", "2"), True),
        # No template tag on either (launched otherwise): start time decides, as before.
        (("2026-11-30T12:10:00Z", None), ("2026-11-30T12:05:00Z", None), True),
        (("2026-11-30T12:05:00Z", None), ("2026-11-30T12:10:00Z", None), False),
    ],
    ids=[
        "pool-start-same-version",
        "stale-pool-instance",
        "newer-template",
        "untagged-later",
        "untagged-earlier",
    ],
)
def test_who_keeps_the_address_between_two_members(
    rig: Rig, mine: tuple[str, str | None], theirs: tuple[str, str | None], i_take_it: bool
) -> None:
    rig.ec2.instances = {SELF: _member(SELF, *mine), OTHER: _member(OTHER, *theirs)}
    assert rig.main() == 0
    assert rig.ec2.address["InstanceId"] == (SELF if i_take_it else OTHER)


def test_the_rule_decides_the_same_way_on_both_members(tmp_path: Path) -> None:
    """Run it from each side: exactly one of the two keeps the address."""
    outcomes = []
    for me, other in ((SELF, OTHER), (OTHER, SELF)):
        (tmp_path / me).mkdir()
        rig = Rig(tmp_path / me)
        rig.imds.identity_value = replace(rig.imds.identity_value, instance_id=me)
        rig.ec2.address["InstanceId"] = other
        rig.ec2.instances = {
            SELF: _member(SELF, "2026-11-30T12:10:00Z", "2"),
            OTHER: _member(OTHER, "2026-11-30T12:05:00Z", "3"),
        }
        assert rig.main() == 0
        outcomes.append(rig.ec2.address["InstanceId"] == me)
    assert sorted(outcomes) == [False, True]
