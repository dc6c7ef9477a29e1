"""The service group's shape: exactly one instance by default, launch-first where chosen, Spot, and how a
deploy replaces the instance (and a warm pool's)."""

from __future__ import annotations

import copy
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import assertions
from aws_cdk import aws_ec2 as ec2

import eip_reclaim
from stacks.config import ConfigError, SpotConfig, parse
from stacks.healing_service import HOOK_HEARTBEAT
from tests.unit.cdk_app import (
    DEFAULT_RAW,
    FEATURE_FLAGS,
    Synthesized,
    default_app,
    launch_first_app,
    multi_app,
    spot_app,
)

GROUP = "AWS::AutoScaling::AutoScalingGroup"
PAUSE = f"PT{int(HOOK_HEARTBEAT.to_minutes())}M"


def groups(app: Synthesized) -> dict[str, dict[str, Any]]:
    """Every service's group resource, by service name."""
    found = {}
    for stack, service in zip(app.stacks.services, app.config.services):
        (group,) = [r for r in app.template_json(stack)["Resources"].values() if r["Type"] == GROUP]
        found[service.name] = group
    return found


def sizes(group: dict[str, Any]) -> tuple[str, str, str]:
    properties = group["Properties"]
    return properties["MinSize"], properties["MaxSize"], properties["DesiredCapacity"]


def service(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(DEFAULT_RAW)
    raw["services"] = [{"name": "web", **changes}]
    return raw


# -- terminate-first, the default: the design's group of exactly one ---------------------------------


@pytest.mark.parametrize("make", [default_app, multi_app], ids=["default", "multi"])
def test_every_default_group_is_exactly_one_instance(make: Any) -> None:
    # min = max = desired = 1: never a second instance, for a deploy or a replacement alike.
    app = make()
    assert {name: sizes(group) for name, group in groups(app).items()} == {
        s.name: ("1", "1", "1") for s in app.config.services
    }
    for group in groups(app).values():
        assert "InstanceMaintenancePolicy" not in group["Properties"]
        assert "MixedInstancesPolicy" not in group["Properties"]


def test_a_default_deploy_terminates_first_and_still_waits_for_the_signal() -> None:
    """aws-facts: group-rolling-min-in-service, group-rolling-signals

    MinInstancesInService 0 < MaxSize 1: the old instance goes, then the new one boots (one boot of
    downtime); the update still waits for the payload's SUCCESS, so a deploy that cannot heal fails.
    """
    (group,) = groups(default_app()).values()
    policy = group["UpdatePolicy"]["AutoScalingRollingUpdate"]
    assert (policy["MaxBatchSize"], policy["MinInstancesInService"]) == (1, 0)
    assert policy["MinInstancesInService"] < int(group["Properties"]["MaxSize"])
    assert (policy["WaitOnResourceSignals"], policy["PauseTime"]) == (True, PAUSE)
    assert "AutoScalingInstanceRefresh" not in group["UpdatePolicy"]
    assert group["CreationPolicy"] == {"ResourceSignal": {"Count": 1, "Timeout": PAUSE}}


def test_the_handover_is_terminate_first_unless_chosen() -> None:
    (web,) = parse(DEFAULT_RAW).services
    assert (web.handover, web.launches_first, web.spot) == ("terminate-first", False, None)


# -- launch-first ------------------------------------------------------------------------------------


def test_launch_first_allows_a_second_instance_for_a_deploy() -> None:
    """aws-facts: group-rolling-min-in-service, group-rolling-signals

    MaxSize 2 and MinInstancesInService 1: CloudFormation launches the new instance beside the old one,
    waits for its SUCCESS, then terminates the old one; the desired capacity stays 1.
    """
    group = groups(launch_first_app())["web"]
    assert sizes(group) == ("1", "2", "1")
    policy = group["UpdatePolicy"]["AutoScalingRollingUpdate"]
    assert (policy["MaxBatchSize"], policy["MinInstancesInService"]) == (1, 1)
    assert (policy["WaitOnResourceSignals"], policy["PauseTime"]) == (True, PAUSE)


@pytest.mark.parametrize("name", ["web", "pooled"])
def test_launch_first_health_replacements_launch_before_terminating(name: str) -> None:
    """aws-facts: group-maintenance-launch-first

    MinHealthyPercentage 100 keeps the unhealthy instance until its replacement is in service (the
    launch hook completed: the payload holds the address); 200 allows the one extra instance.
    """
    group = groups(launch_first_app())[name]
    assert group["Properties"]["InstanceMaintenancePolicy"] == {
        "MinHealthyPercentage": 100,
        "MaxHealthyPercentage": 200,
    }
    # The second instance fits within MaxSize whatever the policy may do beyond it.
    assert sizes(group) == ("1", "2", "1")


# -- a warm pool: a deploy refreshes the pool too ----------------------------------------------------


@pytest.mark.parametrize(
    ("make", "name", "percentages"),
    [(multi_app, "web", (0, 100)), (launch_first_app, "pooled", (100, 200))],
    ids=["terminate-first", "launch-first"],
)
def test_a_deploy_with_a_warm_pool_refreshes_the_pool_too(
    make: Any, name: str, percentages: tuple[int, int]
) -> None:
    """aws-facts: group-warm-pool-rolling-update, group-refresh-warm-pool, group-refresh-no-signal,
    group-refresh-alarm

    A rolling update replaces in-service instances only and would leave the pool's on the old launch
    template version; an instance refresh replaces the in-service instance and then the pool's. It
    does not wait for signals (the launch hook is its readiness) and fails when `Abandoned` fires.
    """
    app = make()
    group = groups(app)[name]
    assert "AutoScalingRollingUpdate" not in group["UpdatePolicy"]
    refresh = group["UpdatePolicy"]["AutoScalingInstanceRefresh"]
    assert refresh["Strategy"] == "Rolling"
    preferences = refresh["Preferences"]
    assert (preferences["MinHealthyPercentage"], preferences["MaxHealthyPercentage"]) == percentages
    assert preferences["SkipMatching"] is True
    (alarm,) = preferences["AlarmSpecification"]["Alarms"]
    (stack,) = [s for s, c in zip(app.stacks.services, app.config.services) if c.name == name]
    resources = app.template_json(stack)["Resources"]
    assert resources[alarm["Ref"]]["Properties"]["MetricName"] == "Abandoned"
    # The create still waits for the first instance's signal.
    assert group["CreationPolicy"] == {"ResourceSignal": {"Count": 1, "Timeout": PAUSE}}
    # The group follows the template's newest version: a new version is what the refresh rolls out.
    assert group["Properties"]["LaunchTemplate"]["Version"]["Fn::GetAtt"][1] == "LatestVersionNumber"


# -- Spot --------------------------------------------------------------------------------------------


def test_spot_is_a_mixed_instances_policy_with_capacity_rebalancing() -> None:
    """aws-facts: group-capacity-rebalance, group-spot-allocation

    Spot only (no on-demand base or share) over the configured types, price-capacity-optimized; on a
    rebalance recommendation Auto Scaling launches the replacement before the old instance goes.
    """
    app = spot_app()
    group = groups(app)["web"]
    properties = group["Properties"]
    assert sizes(group) == ("1", "2", "1")
    assert properties["CapacityRebalance"] is True
    assert "LaunchTemplate" not in properties
    policy = properties["MixedInstancesPolicy"]
    overrides = policy["LaunchTemplate"]["Overrides"]
    assert len(overrides) >= 2
    assert [o["InstanceType"] for o in overrides] == ["t3.micro", "t3a.micro", "m5.large"]
    assert policy["InstancesDistribution"] == {
        "OnDemandBaseCapacity": 0,
        "OnDemandPercentageAboveBaseCapacity": 0,
        "SpotAllocationStrategy": "price-capacity-optimized",
    }
    specification = policy["LaunchTemplate"]["LaunchTemplateSpecification"]
    assert specification["Version"]["Fn::GetAtt"][1] == "LatestVersionNumber"
    assert properties["InstanceMaintenancePolicy"] == {
        "MinHealthyPercentage": 100,
        "MaxHealthyPercentage": 200,
    }
    resources = app.template_json(app.service)["Resources"]
    (template,) = [r for r in resources.values() if r["Type"] == "AWS::EC2::LaunchTemplate"]
    # One image for every type: the first type's architecture (x86_64 here).
    assert template["Properties"]["LaunchTemplateData"]["InstanceType"] == "t3.micro"
    parameters = app.template_json(app.service)["Parameters"]
    (image,) = [p for name, p in parameters.items() if name.startswith("SsmParameterValue")]
    assert image["Default"].endswith("-x86_64")


def test_spot_takes_its_types_in_order() -> None:
    (web,) = parse(
        service(handover="launch-first", spot={"instance_types": ["c7g.large", "m7g.large"]})
    ).services
    assert web.spot == SpotConfig(instance_types=("c7g.large", "m7g.large"))
    assert (web.launch_type, web.is_arm64) == ("c7g.large", True)


@pytest.mark.parametrize(
    ("changes", "key", "message"),
    [
        ({"handover": "blue-green"}, "services[0].handover", "is not one of"),
        ({"handover": 1}, "services[0].handover", "expected a string"),
        (
            {"spot": {"instance_types": ["t4g.micro", "t4g.small"]}},
            "services[0].spot",
            'requires services[0].handover "launch-first"',
        ),
        (
            {"handover": "terminate-first", "spot": {"instance_types": ["t4g.micro", "t4g.small"]}},
            "services[0].spot",
            "requires",
        ),
        (
            {"handover": "launch-first", "spot": {"instance_types": ["t4g.micro", "t3.micro"]}},
            "services[0].spot.instance_types[1]",
            "architecture",
        ),
        (
            {"handover": "launch-first", "spot": {"instance_types": ["t4g.micro"]}},
            "services[0].spot.instance_types",
            "two or more",
        ),
        (
            {"handover": "launch-first", "spot": {"instance_types": ["t4g.micro", "t4g.micro"]}},
            "services[0].spot.instance_types[1]",
            "more than once",
        ),
        (
            {"handover": "launch-first", "spot": {"instance_types": ["t4g.micro", "big"]}},
            "services[0].spot.instance_types[1]",
            "not an EC2 instance type",
        ),
        (
            {"handover": "launch-first", "spot": {"instance_types": "t4g.micro"}},
            "services[0].spot.instance_types",
            "expected a list",
        ),
        (
            {"handover": "launch-first", "spot": {"types": ["t4g.micro", "t4g.small"]}},
            "services[0].spot.types",
            "unknown key",
        ),
        (
            {
                "handover": "launch-first",
                "warm_pool": True,
                "spot": {"instance_types": ["t4g.micro", "t4g.small"]},
            },
            "services[0].spot",
            "warm_pool",
        ),
        (
            {
                "handover": "launch-first",
                "instance_type": "t4g.nano",
                "spot": {"instance_types": ["t4g.micro", "t4g.small"]},
            },
            "services[0].instance_type",
            "remove it",
        ),
    ],
)
def test_bad_handover_and_spot_values_are_one_line_naming_the_key(
    changes: dict[str, Any], key: str, message: str
) -> None:
    """aws-facts: group-warm-pool-no-spot, group-spot-allocation (one architecture)"""
    with pytest.raises(ConfigError) as caught:
        parse(service(**changes))
    assert caught.value.key == key and message in caught.value.problem, str(caught.value)
    assert "\n" not in str(caught.value)


# -- the same choices in the construct library -------------------------------------------------------


def test_the_library_takes_the_handover_and_spot() -> None:
    # HealingService's props reach the same group shape as the app's configuration.
    app = cdk.App(context=FEATURE_FLAGS)
    stack = cdk.Stack(app, "Team")
    nat = eip_reclaim.StableNatProvider()
    network = ec2.Vpc(stack, "Vpc", max_azs=2, nat_gateway_provider=nat)
    egress = eip_reclaim.Egress.stable_nat(nat)
    eip_reclaim.HealingService(stack, "Plain", vpc=network, egress=egress)
    eip_reclaim.HealingService(
        stack,
        "Spot",
        vpc=network,
        egress=egress,
        handover="launch-first",
        spot_instance_types=["c7g.large", "m7g.large"],
    )
    template = assertions.Template.from_stack(stack)
    by_name = {r["Properties"]["AutoScalingGroupName"]: r for r in template.find_resources(GROUP).values()}
    assert sizes(by_name["Team-plain"]) == ("1", "1", "1")
    spot = by_name["Team-spot"]
    assert sizes(spot) == ("1", "2", "1")
    assert spot["Properties"]["CapacityRebalance"] is True
    overrides = spot["Properties"]["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]
    assert [o["InstanceType"] for o in overrides] == ["c7g.large", "m7g.large"]
    assert spot["UpdatePolicy"]["AutoScalingRollingUpdate"]["MinInstancesInService"] == 1


@pytest.mark.parametrize(
    ("props", "match"),
    [
        ({"handover": "sideways"}, r"^HealingService\(Web\)\.handover: 'sideways' is not one of"),
        ({"spot_instance_types": ["t4g.micro", "t4g.small"]}, r"^HealingService\(Web\)\.spot: requires"),
        (
            {
                "handover": "launch-first",
                "instance_type": "t4g.nano",
                "spot_instance_types": ["t4g.micro", "t4g.small"],
            },
            r"^HealingService\(Web\)\.instance_type: with spot",
        ),
    ],
)
def test_the_library_refuses_a_bad_handover_or_spot_naming_the_prop(
    props: dict[str, Any], match: str
) -> None:
    stack = cdk.Stack(cdk.App(context=FEATURE_FLAGS), "Team")
    nat = eip_reclaim.StableNatProvider()
    network = ec2.Vpc(stack, "Vpc", max_azs=2, nat_gateway_provider=nat)
    with pytest.raises(eip_reclaim.ConfigError, match=match):
        eip_reclaim.HealingService(
            stack, "Web", vpc=network, egress=eip_reclaim.Egress.stable_nat(nat), **props
        )
