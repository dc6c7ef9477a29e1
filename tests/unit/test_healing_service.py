"""HealingServiceStack: the Elastic IP, least-privilege role, launch template, group of one and its hook."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk.assertions import Match, Template

from bootstrap.config import parse_config
from stacks.assembly import build
from stacks.bundle import BundleInfo
from stacks.config import parse
from stacks.healing_service import (
    BOOT_ALLOWANCE_SECONDS,
    ELASTIC_IP_LOGICAL_ID,
    GROUP_TAG,
    HOOK_HEARTBEAT,
    LIFECYCLE_HOOK_NAME,
    SERVICE_TAG,
    UNIT_RESTART_SECONDS,
)
from stacks.monitoring import ABANDONED, LAUNCH_UNSUCCESSFUL, METRICS_NAMESPACE
from stacks.payload_config import DEADLINE_SECONDS
from stacks.user_data import USER_DATA_LIMIT
from tests.unit.cdk_app import DEFAULT_RAW, FEATURE_FLAGS, Synthesized, default_app, multi_app

REGION = "ap-southeast-2"
ACCOUNT = "123456789012"
ALLOCATION = "eipalloc-0fedcba9876543210"
PARTITION_ARN = {"Ref": "AWS::Partition"}
# The bootstrap bucket as a deploy in ACCOUNT and REGION names it.
ASSET_BUCKET = f"cdk-hnb659fds-assets-{ACCOUNT}-{REGION}"


@pytest.fixture(scope="module")
def app() -> Synthesized:
    return default_app()


@pytest.fixture(scope="module")
def template(app: Synthesized) -> Template:
    return app.template(app.service)


def the(template: Template, type_: str) -> Any:
    (resource,) = template.find_resources(type_).values()
    return resource


def logical_id_of(template: Template, type_: str) -> str:
    (logical_id,) = template.find_resources(type_)
    return str(logical_id)


def test_the_elastic_ip_has_a_pinned_logical_id_and_is_retained(template: Template) -> None:
    # Renaming or deleting this resource would release the address for good.
    template.has_resource(
        "AWS::EC2::EIP",
        {"Properties": {"Domain": "vpc"}, "DeletionPolicy": "Retain", "UpdateReplacePolicy": "Retain"},
    )
    assert logical_id_of(template, "AWS::EC2::EIP") == ELASTIC_IP_LOGICAL_ID == "ElasticIp"


def statements(template: Template) -> list[dict[str, Any]]:
    policy = the(template, "AWS::IAM::Policy")
    return policy["Properties"]["PolicyDocument"]["Statement"]  # type: ignore[no-any-return]


def sid(statement: dict[str, Any]) -> str:
    return str(statement.get("Sid", ""))


def test_the_role_may_describe_addresses_anywhere_but_change_nothing_else_broadly(template: Template) -> None:
    # The two Describe calls have no resource type; every other action is scoped to this service.
    by_sid = {s.get("Sid", s["Action"]): s for s in statements(template)}
    assert set(by_sid) == {
        "FindTheAddressAndItsHolder",
        "TakeThisAddress",
        "OnlyOntoThisGroupsInstances",
        "ThroughInterfacesOfThisVpc",
        "ReportTheLaunch",
        "cloudformation:SignalResource",
        "PublishHealMetrics",
        "ReadThePayload",
    }
    assert by_sid["FindTheAddressAndItsHolder"] == {
        "Sid": "FindTheAddressAndItsHolder",
        "Action": ["ec2:DescribeAddresses", "ec2:DescribeInstances"],
        "Effect": "Allow",
        "Resource": "*",
    }
    assert all(s["Effect"] == "Allow" for s in by_sid.values())
    assert "Condition" not in by_sid["FindTheAddressAndItsHolder"]


def test_associate_address_only_on_this_address(template: Template) -> None:
    # aws-facts: facts-resource-tag-condition
    # Another service's address, or any other in the account, is out of reach.
    (statement,) = [s for s in statements(template) if sid(s) == "TakeThisAddress"]
    assert statement["Action"] == "ec2:AssociateAddress"
    assert statement["Resource"] == {
        "Fn::Join": [
            "",
            [
                "arn:",
                PARTITION_ARN,
                ":ec2:",
                {"Ref": "AWS::Region"},
                ":",
                {"Ref": "AWS::AccountId"},
                ":elastic-ip/",
                {"Fn::GetAtt": [ELASTIC_IP_LOGICAL_ID, "AllocationId"]},
            ],
        ]
    }


def test_associate_address_only_onto_instances_of_this_group(template: Template) -> None:
    # aws-facts: facts-reserved-group-tag, facts-resource-tag-condition
    # The reserved tag only Auto Scaling sets: anyone with ec2:CreateTags could forge a service tag.
    (statement,) = [s for s in statements(template) if sid(s) == "OnlyOntoThisGroupsInstances"]
    assert statement["Action"] == "ec2:AssociateAddress"
    assert statement["Condition"] == {
        "StringEquals": {"aws:ResourceTag/aws:autoscaling:groupName": "EipReclaim-web"}
    }
    assert GROUP_TAG == "aws:autoscaling:groupName"
    assert statement["Resource"]["Fn::Join"][1][-1] == ":instance/*"
    assert not any(SERVICE_TAG in json.dumps(s.get("Condition", {})) for s in statements(template))


def test_associate_address_through_interfaces_of_this_vpc_only(template: Template) -> None:
    # EC2 may authorize the call on the instance's interface too; the grant stops at this VPC.
    (statement,) = [s for s in statements(template) if sid(s) == "ThroughInterfacesOfThisVpc"]
    assert statement["Action"] == "ec2:AssociateAddress"
    assert statement["Resource"]["Fn::Join"][1][-1] == ":network-interface/*"
    (vpc_arn,) = statement["Condition"]["StringEquals"].values()
    assert list(statement["Condition"]["StringEquals"]) == ["ec2:Vpc"]
    assert ":vpc/" in vpc_arn["Fn::Join"][1]


def test_signal_resource_only_on_this_stack(template: Template) -> None:
    # SignalResource has no finer resource type: the stack's own ARN is the narrowest grant.
    (statement,) = [s for s in statements(template) if s["Action"] == "cloudformation:SignalResource"]
    assert statement == {
        "Action": "cloudformation:SignalResource",
        "Effect": "Allow",
        "Resource": {"Ref": "AWS::StackId"},
    }


def test_metrics_only_into_the_apps_namespace(template: Template) -> None:
    # PutMetricData has no resource type; the namespace condition keeps the role out of other metrics.
    (statement,) = [s for s in statements(template) if sid(s) == "PublishHealMetrics"]
    assert (statement["Action"], statement["Resource"]) == ("cloudwatch:PutMetricData", "*")
    assert statement["Condition"] == {"StringEquals": {"cloudwatch:namespace": METRICS_NAMESPACE}}


def test_complete_lifecycle_action_only_on_this_group(template: Template) -> None:
    # aws-facts: facts-complete-lifecycle-action
    # The role can report the launch of its own group's instances, not steer other groups.
    (statement,) = [s for s in statements(template) if sid(s) == "ReportTheLaunch"]
    assert statement["Action"] == "autoscaling:CompleteLifecycleAction"
    assert (
        statement["Resource"]["Fn::Join"][1][-1] == ":autoScalingGroup:*:autoScalingGroupName/EipReclaim-web"
    )


def test_operators_get_session_manager_and_nothing_more_managed(template: Template) -> None:
    # SSM core access instead of SSH; no other AWS managed policy.
    template.has_resource_properties(
        "AWS::IAM::Role",
        {
            "AssumeRolePolicyDocument": {
                "Statement": [
                    {
                        "Action": "sts:AssumeRole",
                        "Effect": "Allow",
                        "Principal": {"Service": "ec2.amazonaws.com"},
                    }
                ],
                "Version": "2012-10-17",
            },
            "ManagedPolicyArns": [
                {"Fn::Join": ["", ["arn:", PARTITION_ARN, ":iam::aws:policy/AmazonSSMManagedInstanceCore"]]}
            ],
        },
    )


def test_the_security_group_opens_only_the_configured_ports(template: Template) -> None:
    # Port 443 from anywhere for the default web service, nothing else inbound.
    group = the(template, "AWS::EC2::SecurityGroup")
    assert group["Properties"]["SecurityGroupIngress"] == [
        {
            "CidrIp": "0.0.0.0/0",
            "Description": "service port 443",
            "FromPort": 443,
            "IpProtocol": "tcp",
            "ToPort": 443,
        }
    ]


def test_the_launch_template_boots_al2023_without_a_public_ip_and_with_imdsv2(template: Template) -> None:
    # aws-facts: facts-imds-hop-limit
    # No public IPv4 (the address is its only way out), IMDSv2 with one hop, an encrypted root volume.
    template.has_resource_properties(
        "AWS::EC2::LaunchTemplate",
        {
            "LaunchTemplateData": Match.object_like(
                {
                    "InstanceType": "t4g.micro",
                    "MetadataOptions": {
                        "HttpEndpoint": "enabled",
                        "HttpTokens": "required",
                        "HttpPutResponseHopLimit": 1,
                    },
                    "NetworkInterfaces": [
                        {"DeviceIndex": 0, "AssociatePublicIpAddress": False, "Groups": Match.any_value()}
                    ],
                    "BlockDeviceMappings": [
                        {
                            "DeviceName": "/dev/xvda",
                            "Ebs": {
                                "DeleteOnTermination": True,
                                "Encrypted": True,
                                "VolumeSize": 8,
                                "VolumeType": "gp3",
                            },
                        }
                    ],
                }
            )
        },
    )
    (image_parameter,) = [p for p in template.to_json()["Parameters"] if p.startswith("SsmParameterValue")]
    assert template.to_json()["Parameters"][image_parameter]["Default"] == (
        "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-6.1-arm64"
    )


def test_the_group_keeps_exactly_one_instance_over_the_public_subnet_of_every_az(
    app: Synthesized, template: Template
) -> None:
    # min = max = desired = 1 (the default handover, terminate-first); any AZ can host the replacement,
    # always in a public subnet.
    group = the(template, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == ("1", "1", "1")
    assert group["AutoScalingGroupName"] == "EipReclaim-web"
    network = app.template_json(app.network)
    zone_outputs = [exported_value(network, ref) for ref in group["VPCZoneIdentifier"]]
    public = [
        {"Ref": logical_id}
        for logical_id, r in network["Resources"].items()
        if r["Type"] == "AWS::EC2::Subnet"
        and {"Key": "aws-cdk:subnet-type", "Value": "Public"} in r["Properties"]["Tags"]
    ]
    assert sorted(zone_outputs, key=str) == sorted(public, key=str) and len(public) == 2


def test_instances_are_tagged_for_this_service_at_launch(template: Template) -> None:
    # The tag the role's AssociateAddress condition checks.
    group = the(template, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    assert {"Key": SERVICE_TAG, "Value": "web", "PropagateAtLaunch": True} in group["Tags"]


def test_the_launch_hook_holds_every_instance_and_abandons_by_default(template: Template) -> None:
    # aws-facts: facts-hook-default-result
    # Part of the group itself so the first instance waits too; an instance that never reports is replaced.
    group = the(template, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    assert group["LifecycleHookSpecificationList"] == [
        {
            "LifecycleHookName": LIFECYCLE_HOOK_NAME,
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "DefaultResult": "ABANDON",
            # 120 s of boot and install, a 240 s run, the unit's 30 s restart delay, one more 240 s run.
            "HeartbeatTimeout": 660,
        }
    ]
    template.resource_count_is("AWS::AutoScaling::LifecycleHook", 0)


def test_the_hook_window_covers_the_boot_a_run_and_one_retry() -> None:
    # The window starts at launch: a run that needs its whole deadline and then its one retry (exit 75,
    # RestartSec later) must still be able to report before the hook defaults to ABANDON.
    assert HOOK_HEARTBEAT.to_seconds() >= BOOT_ALLOWANCE_SECONDS + 2 * (
        DEADLINE_SECONDS + UNIT_RESTART_SECONDS
    )
    assert BOOT_ALLOWANCE_SECONDS >= 60
    # Auto Scaling accepts at most 7200 s; a window far beyond a retry only delays replacing a dead instance.
    assert HOOK_HEARTBEAT.to_seconds() <= 900


def exported_value(network: dict[str, Any], reference: dict[str, Any]) -> Any:
    """The network output a strong reference (Fn::ImportValue of its export) names."""
    (name,) = [
        k
        for k, o in network["Outputs"].items()
        if o.get("Export", {}).get("Name") == reference["Fn::ImportValue"]
    ]
    return network["Outputs"][name]["Value"]


def test_the_network_is_referenced_strongly_and_the_topic_weakly(
    app: Synthesized, template: Template
) -> None:
    # A network deploy that would replace the VPC or a subnet under a running service fails on the
    # export lock; the topic may change (to a team's own) without locking the network stack.
    body = json.dumps(template.to_json())
    network = app.template_json(app.network)
    exported = {o["Value"]["Ref"] for o in network["Outputs"].values() if "Export" in o}
    subnets_and_vpc = {k for k, r in network["Resources"].items() if r["Type"] == "AWS::EC2::VPC"} | {
        k
        for k, r in network["Resources"].items()
        if r["Type"] == "AWS::EC2::Subnet"
        and {"Key": "aws-cdk:subnet-type", "Value": "Public"} in r["Properties"]["Tags"]
    }
    assert exported == subnets_and_vpc
    assert body.count("Fn::ImportValue") >= 3
    assert all("Topic" in ref["OutputName"] for ref in _stack_outputs(template.to_json()))


def _stack_outputs(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        found = [value["Fn::GetStackOutput"]] if "Fn::GetStackOutput" in value else []
        return found + [r for v in value.values() for r in _stack_outputs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _stack_outputs(v)]
    return []


def render(value: Any, network: dict[str, Any]) -> str:
    """A template expression as the deploy would render it, with stand-ins for region, ids and imports."""
    if isinstance(value, str):
        return value
    if "Fn::Join" in value:
        sep, parts = value["Fn::Join"]
        return str(sep).join(render(part, network) for part in parts)
    if value == {"Ref": "AWS::Region"}:
        return REGION
    if value == {"Ref": "AWS::Partition"}:
        return "aws"
    if value == {"Ref": "AWS::StackName"}:
        return "EipReclaim-web"
    if "Fn::Sub" in value:  # the asset bucket: the bootstrap bucket of the account and region
        text = str(value["Fn::Sub"])
        text = text.replace("${AWS::AccountId}", ACCOUNT).replace("${AWS::Region}", REGION)
        assert "${" not in text, text
        return text
    if value == {"Fn::GetAtt": [ELASTIC_IP_LOGICAL_ID, "AllocationId"]}:
        return ALLOCATION
    if "Fn::ImportValue" in value:
        exported = exported_value(network, value)
        return f"subnet-{exported['Ref']}"
    raise AssertionError(f"unexpected expression in user data: {value}")


def user_data_of(template: Template, network: dict[str, Any]) -> str:
    """The launch template's user data as the instance receives it, with stand-ins for deploy-time values."""
    user_data = the(template, "AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]["UserData"]
    return render(user_data["Fn::Base64"], network)


def payload_config_of(template: Template, network: dict[str, Any]) -> dict[str, Any]:
    """The JSON object the user data writes to /etc/eip-reclaim/config.json."""
    lines = user_data_of(template, network).splitlines()
    # The heredoc the lab reads too: its marker, then the configuration on one line.
    (start,) = [i for i, line in enumerate(lines) if line.endswith("<<'EIP_RECLAIM_CONFIG'")]
    assert lines[start + 2] == "EIP_RECLAIM_CONFIG"
    return json.loads(lines[start + 1])  # type: ignore[no-any-return]


def as_deployed(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration with hex subnet ids where `render` left stand-ins (a deploy fills in real ones)."""
    if "nat_by_subnet" not in config:
        return config
    hexed = {
        key: key if re.fullmatch(r"subnet-[0-9a-f]{8,17}", key) else f"subnet-{index:017x}"
        for index, key in enumerate(config["nat_by_subnet"])
    }
    return dict(config, nat_by_subnet={hexed[k]: v for k, v in config["nat_by_subnet"].items()})


def nat_ip_by_subnet(network: dict[str, Any]) -> dict[str, str]:
    """From the network template itself: public subnet logical id -> its NAT interface's private IPv4."""
    found = {}
    for resource in network["Resources"].values():
        if resource["Type"] == "AWS::EC2::NetworkInterface":
            interface = resource["Properties"]
            found[f"subnet-{interface['SubnetId']['Ref']}"] = interface["PrivateIpAddress"]
    return found


def test_user_data_carries_the_payload_config_with_the_generated_subnet_nat_map(
    app: Synthesized, template: Template
) -> None:
    # The contract in docs/payload.md ("Configuration", `nat_by_subnet`); the map comes from the network's
    # own NAT instances, never typed by hand.
    # The strategy is written even though it is the payload's default: the file says how it gets out.
    network = app.template_json(app.network)
    config = payload_config_of(template, network)
    assert config == {
        "version": 1,
        "region": REGION,
        "allocation_id": ALLOCATION,
        "egress": "policy-route",
        "nat_by_subnet": nat_ip_by_subnet(network),
        "lifecycle_hook": {
            "auto_scaling_group": "EipReclaim-web",
            "hook": LIFECYCLE_HOOK_NAME,
            "timeout_seconds": 660,
        },
        "signal": {
            "stack": "EipReclaim-web",
            "resource": logical_id_of(template, "AWS::AutoScaling::AutoScalingGroup"),
        },
        "metrics": {"namespace": METRICS_NAMESPACE, "service": "web"},
        "deadline_seconds": DEADLINE_SECONDS,
    }
    assert sorted(config["nat_by_subnet"].values()) == ["10.0.0.4", "10.0.1.4"]
    # ... and the payload's own validator accepts it, once the subnet ids are real ones.
    parsed = parse_config(as_deployed(config))
    assert (parsed.egress, parsed.dualstack, len(parsed.nat_by_subnet)) == ("policy-route", False, 2)


def payload_asset(app: Synthesized, stack: cdk.Stack) -> s3_assets.Asset:
    asset = stack.node.find_child("Healing").node.find_child("Payload")
    assert isinstance(asset, s3_assets.Asset)
    return asset


def test_user_data_fetches_the_payload_asset_and_checks_the_bundles_hash(
    app: Synthesized, template: Template
) -> None:
    # The instance installs exactly the bundle this synth built: the asset's object, verified by its SHA-256.
    script = user_data_of(template, app.template_json(app.network))
    key = payload_asset(app, app.service).s3_object_key
    assert f"bundle_url='s3://{ASSET_BUCKET}/{key}'\n" in script
    assert f"bundle_sha256='{app.stacks.bundle.sha256}'\n" in script
    assert script.startswith("#!/bin/bash\nset -euo pipefail\n")
    # The asset is the bundle itself, staged into the cloud assembly for upload.
    staged = app.outdir / f"asset.{payload_asset(app, app.service).asset_hash}.zip"
    assert hashlib.sha256(staged.read_bytes()).hexdigest() == app.stacks.bundle.sha256


def test_the_role_reads_only_the_payload_object(app: Synthesized, template: Template) -> None:
    # One GetObject on the one object: no listing, no other asset of the shared bootstrap bucket.
    network = app.template_json(app.network)
    (statement,) = [s for s in statements(template) if sid(s) == "ReadThePayload"]
    assert statement["Action"] == "s3:GetObject"
    key = payload_asset(app, app.service).s3_object_key
    assert render(statement["Resource"], network) == f"arn:aws:s3:::{ASSET_BUCKET}/{key}"
    s3_actions = [
        action
        for s in statements(template)
        for action in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
        if action.startswith("s3:")
    ]
    assert s3_actions == ["s3:GetObject"]


def test_user_data_stays_far_below_the_16_kb_limit(app: Synthesized, template: Template) -> None:
    # EC2 refuses more than 16 KB; the config grows with the AZ count, so keep a wide margin.
    size = len(user_data_of(template, app.template_json(app.network)).encode())
    print(f"\nuser data of the default service: {size} bytes ({size / USER_DATA_LIMIT:.0%} of 16 KB)")
    assert size < USER_DATA_LIMIT // 4


def test_a_create_waits_for_the_payloads_signal(template: Template) -> None:
    # aws-facts: facts-creation-policy-signals
    # A stack whose instance cannot take its address fails and rolls back instead of reporting success.
    group = the(template, "AWS::AutoScaling::AutoScalingGroup")
    assert group["CreationPolicy"] == {
        "ResourceSignal": {"Count": 1, "Timeout": "PT11M"}  # the hook's 660 s window
    }


def test_a_new_launch_template_rolls_the_one_instance_and_waits_for_its_signal(template: Template) -> None:
    # The group's name is fixed, so only a rolling update can replace its instance. MinInstancesInService
    # 0 < MaxSize 1 (the default, terminate-first; launch-first: tests/unit/test_group_shape.py): the old
    # one goes, the new one boots, and CloudFormation waits for its SUCCESS (the payload's signal after it
    # holds the address). The pause spans the hook's window, and the processes that would fight the
    # update are suspended (Launch and Terminate stay on). aws-facts: group-rolling-min-in-service
    group = the(template, "AWS::AutoScaling::AutoScalingGroup")
    policy = group["UpdatePolicy"]["AutoScalingRollingUpdate"]
    assert (policy["MaxBatchSize"], policy["MinInstancesInService"]) == (1, 0)
    assert policy["MinInstancesInService"] < int(group["Properties"]["MaxSize"])
    assert policy["PauseTime"] == "PT11M"  # the hook's 660 s window
    assert policy["WaitOnResourceSignals"] is True
    assert "AutoScalingInstanceRefresh" not in group["UpdatePolicy"]
    assert {"HealthCheck", "ReplaceUnhealthy", "AZRebalance", "ScheduledActions"} <= set(
        policy["SuspendProcesses"]
    )
    assert not {"Launch", "Terminate"} & set(policy["SuspendProcesses"])
    assert "AutoScalingReplacingUpdate" not in group["UpdatePolicy"]
    # The group follows the template's newest version, so a new version is a change to the group.
    assert group["Properties"]["LaunchTemplate"]["Version"] == {
        "Fn::GetAtt": [logical_id_of(template, "AWS::EC2::LaunchTemplate"), "LatestVersionNumber"]
    }


def test_new_payload_bytes_change_the_user_data_and_no_logical_id(
    app: Synthesized, template: Template, tmp_path: Path
) -> None:
    # A payload edit must reach the instance (new user data -> new launch template version -> rolling
    # update) without renaming anything stateful: the address, the group, the template itself.
    other = tmp_path / "other-bundle.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("bootstrap/__init__.py", "# another payload\n")
    data = other.read_bytes()
    bundle = BundleInfo(
        path=other, sha256=hashlib.sha256(data).hexdigest(), size=len(data), file_count=1, input_hash="x"
    )
    assert bundle.sha256 != app.stacks.bundle.sha256
    rebuilt = cdk.App(context=FEATURE_FLAGS, outdir=str(tmp_path / "cdk.out"))
    # With the checks, as `cdk synth` runs: CDK's own validations want the acknowledgements.
    stacks = build(rebuilt, parse(DEFAULT_RAW), bundle=bundle)
    rebuilt.synth()
    changed = Template.from_json(
        json.loads((tmp_path / "cdk.out" / f"{stacks.services[0].artifact_id}.template.json").read_text())
    )

    before, after = template.to_json()["Resources"], changed.to_json()["Resources"]
    assert sorted(after) == sorted(before)
    assert {r["Type"]: k for k, r in after.items()} == {r["Type"]: k for k, r in before.items()}
    assert ELASTIC_IP_LOGICAL_ID in after
    network = app.template_json(app.network)
    old_script, new_script = user_data_of(template, network), user_data_of(changed, network)
    assert f"bundle_sha256='{bundle.sha256}'" in new_script and app.stacks.bundle.sha256 not in new_script
    key = stacks.services[0].node.find_child("Healing").node.find_child("Payload")
    assert isinstance(key, s3_assets.Asset) and f"/{key.s3_object_key}'" in new_script
    assert old_script != new_script
    # Only the user data and the one object the role may read differ.
    diff = {
        logical_id
        for logical_id in before
        if json.dumps(before[logical_id], sort_keys=True) != json.dumps(after[logical_id], sort_keys=True)
    }
    assert diff == {
        logical_id_of(template, "AWS::EC2::LaunchTemplate"),
        logical_id_of(template, "AWS::IAM::Policy"),
    }
    assert payload_config_of(changed, network) == payload_config_of(template, network)


def test_outputs_give_the_address_its_allocation_and_the_group(template: Template) -> None:
    # What an operator needs after `cdk deploy`.
    template.has_output("PublicIp", {"Value": {"Fn::GetAtt": [ELASTIC_IP_LOGICAL_ID, "PublicIp"]}})
    template.has_output("AllocationId", {"Value": {"Fn::GetAtt": [ELASTIC_IP_LOGICAL_ID, "AllocationId"]}})
    template.has_output("AutoScalingGroupName", {"Value": "EipReclaim-web"})


@pytest.fixture(scope="module")
def multi() -> Synthesized:
    return multi_app()


class TestSeveralServicesAndAnAdoptedAddress:
    """Two services in one network; the second adopts an existing allocation."""

    def test_one_stack_per_service_sharing_the_network(self, multi: Synthesized) -> None:
        # Each service is deployed and destroyed on its own; the network is shared.
        names = sorted(multi.templates())
        assert names == ["Multi-Network.template.json", "Multi-smtp.template.json", "Multi-web.template.json"]

    def test_an_adopted_address_is_used_not_created(self, multi: Synthesized) -> None:
        # Adoption must not allocate a second address, and the role is scoped to the adopted one.
        smtp = multi.template(multi.stacks.services[1])
        smtp.resource_count_is("AWS::EC2::EIP", 0)
        (statement,) = [s for s in statements(smtp) if sid(s) == "TakeThisAddress"]
        assert statement["Resource"]["Fn::Join"][1][-1] == ":elastic-ip/eipalloc-0123456789abcdef0"
        config = payload_config_of(smtp, multi.template_json(multi.network))
        assert config["allocation_id"] == "eipalloc-0123456789abcdef0"
        assert len(config["nat_by_subnet"]) == 3
        smtp.has_output("AllocationId", {"Value": "eipalloc-0123456789abcdef0"})
        assert "PublicIp" not in smtp.to_json()["Outputs"]

    def test_each_service_has_its_own_type_ports_tag_and_group(self, multi: Synthesized) -> None:
        # Nothing leaks between services: ports, instance type, the role's tag condition.
        web, smtp = (multi.template(s) for s in multi.stacks.services)
        smtp.has_resource_properties(
            "AWS::EC2::LaunchTemplate",
            {"LaunchTemplateData": Match.object_like({"InstanceType": "t3.small"})},
        )
        assert [
            r["FromPort"] for r in the(web, "AWS::EC2::SecurityGroup")["Properties"]["SecurityGroupIngress"]
        ] == [80, 443]
        assert the(smtp, "AWS::EC2::SecurityGroup")["Properties"]["SecurityGroupIngress"] == [
            {
                "CidrIp": "192.0.2.0/24",
                "Description": "service port 25",
                "FromPort": 25,
                "IpProtocol": "tcp",
                "ToPort": 25,
            }
        ]
        (condition,) = [s["Condition"] for s in statements(smtp) if sid(s) == "OnlyOntoThisGroupsInstances"]
        assert condition == {"StringEquals": {f"aws:ResourceTag/{GROUP_TAG}": "Multi-smtp"}}
        assert (
            the(smtp, "AWS::AutoScaling::AutoScalingGroup")["Properties"]["AutoScalingGroupName"]
            == "Multi-smtp"
        )
        (parameter,) = [p for p in smtp.to_json()["Parameters"] if p.startswith("SsmParameterValue")]
        assert smtp.to_json()["Parameters"][parameter]["Default"].endswith("-x86_64")


def test_group_metrics_feed_the_no_instance_alarm(template: Template) -> None:
    # Without group metrics the in-service alarm would have no data to watch.
    group = the(template, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    assert group["MetricsCollection"] == [{"Granularity": "1Minute", "Metrics": ["GroupInServiceInstances"]}]


def alarm_topic(app: Synthesized) -> Any:
    """How the service stack names the app's topic: a reference to the network stack's."""
    network = app.template_json(app.network)
    (topic_id,) = [k for k, r in network["Resources"].items() if r["Type"] == "AWS::SNS::Topic"]
    return topic_id


def test_an_alarm_when_the_service_has_no_instance_in_service(app: Synthesized, template: Template) -> None:
    # The heal failed for five minutes: the team hears of it on the app's topic.
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "Namespace": "AWS/AutoScaling",
            "MetricName": "GroupInServiceInstances",
            "Dimensions": [{"Name": "AutoScalingGroupName", "Value": "EipReclaim-web"}],
            "ComparisonOperator": "LessThanThreshold",
            "Threshold": 1,
            "Period": 60,
            "EvaluationPeriods": 5,
            "AlarmActions": [Match.any_value()],
        },
    )
    assert alarm_topic(app)


def test_an_alarm_when_the_payload_abandons(template: Template) -> None:
    # No event exists for an abandoned lifecycle action: the payload's own metric is the signal.
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "Namespace": METRICS_NAMESPACE,
            "MetricName": ABANDONED,
            "Dimensions": [{"Name": "Service", "Value": "web"}],
            "Statistic": "Sum",
            "Period": 300,
            "EvaluationPeriods": 1,
            "Threshold": 1,
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            "TreatMissingData": "notBreaching",
            "AlarmActions": [Match.any_value()],
        },
    )


def test_failed_launches_of_the_group_reach_the_topic(template: Template) -> None:
    # Capacity or a broken launch template: Auto Scaling's event, routed to the same topic.
    rule = the(template, "AWS::Events::Rule")["Properties"]
    assert rule["EventPattern"] == {
        "source": ["aws.autoscaling"],
        "detail-type": [LAUNCH_UNSUCCESSFUL],
        "detail": {"AutoScalingGroupName": ["EipReclaim-web"]},
    }
    (target,) = rule["Targets"]
    assert "Fn::GetStackOutput" in json.dumps(target["Arn"])
