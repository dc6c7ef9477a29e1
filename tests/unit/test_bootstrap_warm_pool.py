"""Why the instance boots (IMDS autoscaling/target-lifecycle-state) and who keeps the address when warm
pools and overlapping updates put two members of a group side by side.
"""

from __future__ import annotations

import errno
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bootstrap.egress.policy_route import TABLE
from tests.unit.test_bootstrap_fakes import AL2023_TABLE, OTHER, SELF, Rig

SIGNAL = {"stack": "EipReclaim-web", "resource": "GroupASG0123ABCD"}
HOOK_660 = {"auto_scaling_group": "svc-asg", "hook": "svc-launch", "timeout_seconds": 660}


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


@pytest.mark.parametrize(
    ("overrides", "exit_code"),
    [
        ({"nat_by_subnet": {"subnet-0bbb": "10.0.1.4"}}, 2),  # no NAT for its subnet: final at once
        ({"lifecycle_hook": HOOK_660}, 75),  # a route change refused, the hook's window spent
    ],
    ids=["config-error", "transient-window-spent"],
)
def test_a_warming_instance_that_fails_never_signals_the_stack(
    rig: Rig, overrides: dict[str, Any], exit_code: int
) -> None:
    """A pool refill happens during stack updates too: a FAILURE signal from a pool instance would fail
    the update (aws-facts: payload-warm-pool-refill; aws-facts: payload-signal-resource-failure;
    aws-facts: payload-warm-pool-signal; aws-facts: facts-imds-target-lifecycle-state)."""
    rig.imds.target_state = "Warmed:Pending:Wait"
    rig.netlink.fail_on = {"add": errno.EPERM}
    assert rig.main(config=rig.config(signal=SIGNAL, **overrides)) == exit_code
    assert rig.cloudformation.calls == []  # before the fix: a FAILURE signal
    # The launch action into the pool is still abandoned: the group replaces the pool instance.
    assert [c["LifecycleActionResult"] for c in rig.autoscaling.completed] == ["ABANDON"]
    assert rig.netlink.table == AL2023_TABLE


def test_a_warming_instance_never_signals_success(rig: Rig) -> None:
    """aws-facts: payload-warm-pool-signal"""
    rig.imds.target_state = "Warmed:Running"
    assert rig.main(config=rig.config(signal=SIGNAL)) == 0
    assert rig.cloudformation.calls == []
    assert [c["LifecycleActionResult"] for c in rig.autoscaling.completed] == ["CONTINUE"]


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


TEMPLATE = "lt-0123456789abcdef0"
OTHER_TEMPLATE = "lt-0fedcba9876543210"


def _member(instance_id: str, launched: str, version: str | None, template: str = TEMPLATE) -> dict[str, Any]:
    """A running member of the group; EC2 tags one launched from a launch template with its id and version
    (aws-facts: payload-launch-template-tags)."""
    tags = [{"Key": "aws:autoscaling:groupName", "Value": "svc-asg"}]
    if version is not None:
        tags.append({"Key": "aws:ec2launchtemplate:id", "Value": template})
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
        # Two templates (the group's template replaced by another): their version numbers count apart and
        # are not compared; the one started last wins, whatever its number.
        (("2026-11-30T12:10:00Z", "1", OTHER_TEMPLATE), ("2026-11-30T12:05:00Z", "7"), True),
        (("2026-11-30T12:05:00Z", "7"), ("2026-11-30T12:10:00Z", "1", OTHER_TEMPLATE), False),
    ],
    ids=[
        "pool-start-same-version",
        "stale-pool-instance",
        "newer-template",
        "untagged-later",
        "untagged-earlier",
        "other-template-started-later",
        "other-template-started-earlier",
    ],
)
def test_who_keeps_the_address_between_two_members(
    rig: Rig, mine: tuple[str, ...], theirs: tuple[str, ...], i_take_it: bool
) -> None:
    """aws-facts: payload-launch-template-tags; aws-facts: payload-launch-template-version-numbers;
    aws-facts: payload-launch-time-at-start"""
    rig.ec2.instances = {SELF: _member(SELF, *mine), OTHER: _member(OTHER, *theirs)}
    assert rig.main() == 0
    assert rig.ec2.address["InstanceId"] == (SELF if i_take_it else OTHER)


@pytest.mark.parametrize("other_template", [TEMPLATE, OTHER_TEMPLATE])
def test_the_rule_decides_the_same_way_on_both_members(tmp_path: Path, other_template: str) -> None:
    """Run it from each side: exactly one of the two keeps the address.

    aws-facts: payload-launch-template-tags
    """
    outcomes = []
    for me, other in ((SELF, OTHER), (OTHER, SELF)):
        (tmp_path / me).mkdir()
        rig = Rig(tmp_path / me)
        rig.imds.identity_value = replace(rig.imds.identity_value, instance_id=me)
        rig.ec2.address["InstanceId"] = other
        rig.ec2.instances = {
            SELF: _member(SELF, "2026-11-30T12:10:00Z", "2"),
            OTHER: _member(OTHER, "2026-11-30T12:05:00Z", "3", other_template),
        }
        assert rig.main() == 0
        outcomes.append(rig.ec2.address["InstanceId"] == me)
    assert sorted(outcomes) == [False, True]
