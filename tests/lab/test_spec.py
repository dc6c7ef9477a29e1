"""How the lab reads its spec from synthesized templates (no root needed)."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest

from tests.lab import spec


def templates(config_parts: list[Any]) -> list[dict[str, Any]]:
    """A network template with two public subnets and a service template whose user data is a join."""
    network = {
        "Resources": {
            "Vpc": {"Type": "AWS::EC2::VPC", "Properties": {"CidrBlock": "10.9.0.0/16"}},
            "PubA": {
                "Type": "AWS::EC2::Subnet",
                "Properties": {
                    "CidrBlock": "10.9.0.0/24",
                    "AvailabilityZone": {"Fn::Select": [0, {"Fn::GetAZs": ""}]},
                },
            },
            "PubB": {
                "Type": "AWS::EC2::Subnet",
                "Properties": {
                    "CidrBlock": "10.9.1.0/24",
                    "AvailabilityZone": {"Fn::Select": [1, {"Fn::GetAZs": ""}]},
                },
            },
        },
        "Outputs": {
            "OutA": {"Value": {"Ref": "PubA"}, "Export": {"Name": "net:OutA"}},
            "OutB": {"Value": {"Ref": "PubB"}},
        },
    }
    user_data = {
        "Fn::Base64": {"Fn::Join": ["", ["#!/bin/bash\ncat > /etc/x <<'EOF'\n", *config_parts, "\nEOF\n"]]}
    }
    service = {
        "Resources": {
            "Lt": {
                "Type": "AWS::EC2::LaunchTemplate",
                "Properties": {"LaunchTemplateData": {"UserData": user_data}},
            }
        }
    }
    return [network, service]


CONFIG_PARTS = [
    '{"version":1,"region":"',
    {"Ref": "AWS::Region"},
    '","allocation_id":"',
    {"Fn::GetAtt": ["ElasticIp", "AllocationId"]},
    '","nat_by_subnet":{"',
    {"Fn::ImportValue": "net:OutA"},
    '":"10.9.0.4","',
    {"Fn::GetStackOutput": {"StackName": "net", "OutputName": "OutB"}},
    '":"10.9.1.4"},"lifecycle_hook":{"auto_scaling_group":"',
    {"Fn::Join": ["-", [{"Ref": "AWS::StackName"}, "asg"]]},
    '","hook":"launch"},"deadline_seconds":240}',
]


def test_subnets_nat_addresses_and_config_come_from_the_templates() -> None:
    lab_spec = spec.from_templates(templates(CONFIG_PARTS), "test")
    assert lab_spec.vpc_cidr == ipaddress.IPv4Network("10.9.0.0/16")
    assert [(s.key, s.az_index, str(s.cidr), str(s.nat_ip)) for s in lab_spec.subnets] == [
        ("PubA", 0, "10.9.0.0/24", "10.9.0.4"),
        ("PubB", 1, "10.9.1.0/24", "10.9.1.4"),
    ]
    assert lab_spec.config["region"] == spec.REGION
    assert lab_spec.config["allocation_id"] == spec.ALLOCATION_ID
    assert lab_spec.config["lifecycle_hook"] == {
        "auto_scaling_group": spec.AUTO_SCALING_GROUP,
        "hook": "launch",
    }


def test_render_fills_deploy_time_values_and_adds_endpoints() -> None:
    lab_spec = spec.from_templates(templates(CONFIG_PARTS), "test")
    config = spec.render_config(
        lab_spec,
        region="ap-southeast-2",
        subnet_ids={"PubA": "subnet-a", "PubB": "subnet-b"},
        allocation_id="eipalloc-1",
        auto_scaling_group="asg",
        endpoints={"ec2_endpoint_url": "http://x"},
        deadline_seconds=6,
    )
    assert config == {
        "version": 1,
        "region": "ap-southeast-2",
        "allocation_id": "eipalloc-1",
        "nat_by_subnet": {"subnet-a": "10.9.0.4", "subnet-b": "10.9.1.4"},
        "lifecycle_hook": {"auto_scaling_group": "asg", "hook": "launch"},
        "deadline_seconds": 6,
        "ec2_endpoint_url": "http://x",
        "test": True,
    }


def test_a_value_the_lab_cannot_fill_is_an_error() -> None:
    parts = [*CONFIG_PARTS[:-1], '","hook":"launch"},"deadline_seconds":240,"x":"', {"Ref": "Other"}, '"}']
    with pytest.raises(RuntimeError, match="cannot fill"):
        spec.from_templates(templates(parts), "test")


def test_user_data_without_the_config_is_an_error() -> None:
    broken = templates(CONFIG_PARTS)
    broken[1]["Resources"]["Lt"]["Properties"]["LaunchTemplateData"]["UserData"] = "#!/bin/bash\n"
    with pytest.raises(RuntimeError, match="carries the config"):
        spec.from_templates(broken, "test")


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ("ipv6", {"egress": "direct", "dualstack": True}),
        ("interface-endpoints", {"egress": "direct"}),
    ],
)
def test_configs_for_the_direct_networks_replace_only_the_egress_keys(
    network: str, expected: dict[str, Any]
) -> None:
    """The ipv6 and interface-endpoints networks' configurations, derived from the nat-instances synth:
    no NAT map, egress direct (+ dualstack), everything else as synthesized; and the payload takes them."""
    from bootstrap.config import parse_config

    lab_spec = spec.from_templates(templates(CONFIG_PARTS), "test")
    derived = spec.network_config(lab_spec.config, network)
    kept = {k: v for k, v in lab_spec.config.items() if k != "nat_by_subnet"}
    assert derived == {**kept, **expected}
    assert "nat_by_subnet" in lab_spec.config  # the synth's own config is left as it was
    rendered = spec.render_config(
        dataclasses.replace(lab_spec, config=derived),
        region="ap-southeast-2",
        subnet_ids={"PubA": "subnet-a", "PubB": "subnet-b"},
        allocation_id="eipalloc-1",
        auto_scaling_group="asg",
        endpoints={"ec2_endpoint_url": "http://[2001:db8::1]:8080"},
    )
    parsed = parse_config(rendered)
    assert (parsed.egress, parsed.dualstack, dict(parsed.nat_by_subnet)) == (
        "direct",
        network == "ipv6",
        {},
    )


def test_only_the_direct_networks_are_derived() -> None:
    with pytest.raises(ValueError, match="nat-instances"):
        spec.network_config({}, "nat-instances")


@pytest.mark.parametrize("network", ["ipv6", "interface-endpoints"])
def test_derived_configs_match_what_the_stacks_write_for_that_network(network: str) -> None:
    """network_config of the stacks' nat-instances config is the stacks' own config for `network`."""
    from stacks.payload_config import payload_config

    common: dict[str, Any] = {
        "allocation_id": "eipalloc-1",
        "nat_by_subnet": [],
        "auto_scaling_group": "asg",
        "lifecycle_hook": "launch",
        "hook_timeout_seconds": 660,
        "stack_name": "stack",
        "group_logical_id": "Group",
        "service": "web",
    }
    nat_instances = payload_config(egress="policy-route", dualstack=False, **common)
    written = payload_config(egress="direct", dualstack=network == "ipv6", **common)
    assert spec.network_config(nat_instances, network) == written
