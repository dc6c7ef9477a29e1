"""NetworkStack: the VPC, its subnets, NAT instances at stable addresses, S3 endpoint and flow logs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Match, Template

from stacks.monitoring import HEAL_SECONDS, HEALED, METRICS_NAMESPACE
from stacks.nat import (
    AL2023_PARAMETER,
    BOOT_UNIT,
    ENV_FILE,
    LIFECYCLE_HOOK_NAME,
    LINK_LOCAL,
    NETWORK_SCRIPT,
    iptables_rules,
    nat_address,
    nat_network_setup,
)
from tests.unit.cdk_app import DEFAULT_RAW, Synthesized, default_app, multi_app, synthesize


@pytest.fixture(scope="module")
def app() -> Synthesized:
    return default_app()


@pytest.fixture(scope="module")
def template(app: Synthesized) -> Template:
    return app.template(app.network)


def resources(template: Template, type_: str, props: Any = None) -> Any:
    return template.find_resources(type_, {"Properties": props} if props else None)


def logical_id(template: Template, type_: str, props: dict[str, Any]) -> str:
    (found,) = resources(template, type_, props)
    return str(found)


def test_the_vpc_has_the_configured_cidr(template: Template) -> None:
    # Every NAT address and security group rule is derived from this block.
    template.resource_count_is("AWS::EC2::VPC", 1)
    template.has_resource_properties("AWS::EC2::VPC", {"CidrBlock": "10.0.0.0/16"})


def test_a_public_and_a_private_subnet_per_az_without_lookups(template: Template) -> None:
    # Two AZs picked from the deploy region at deploy time: the default synthesizes with no account.
    for index in range(2):
        az = {"Fn::Select": [index, {"Fn::GetAZs": ""}]}
        for kind in ("Public", "Private"):
            template.has_resource_properties(
                "AWS::EC2::Subnet",
                {
                    "AvailabilityZone": az,
                    "Tags": Match.array_with([{"Key": "aws-cdk:subnet-type", "Value": kind}]),
                },
            )
    template.resource_count_is("AWS::EC2::Subnet", 4)


def test_no_subnet_hands_out_public_ipv4(template: Template) -> None:
    # A healed instance must boot without a public IP; only the NATs ask for one explicitly.
    for subnet in resources(template, "AWS::EC2::Subnet").values():
        assert subnet["Properties"]["MapPublicIpOnLaunch"] is False


def test_one_stable_nat_interface_per_az_at_the_fifth_address_of_its_public_subnet(
    template: Template,
) -> None:
    # The address lives on an interface that outlives NAT instances: a replacement never needs it freed.
    for cidr, nat_ip in (("10.0.0.0/24", "10.0.0.4"), ("10.0.1.0/24", "10.0.1.4")):
        subnet = logical_id(template, "AWS::EC2::Subnet", {"CidrBlock": cidr})
        template.has_resource_properties(
            "AWS::EC2::NetworkInterface",
            {
                "SubnetId": {"Ref": subnet},
                "PrivateIpAddress": nat_ip,
                "SourceDestCheck": False,
                "GroupSet": [{"Fn::GetAtt": [Match.string_like_regexp("NatSecurityGroup"), "GroupId"]}],
            },
        )
    template.resource_count_is("AWS::EC2::NetworkInterface", 2)
    # No NAT is a bare instance any more, and no launch template pins an address or an interface.
    template.resource_count_is("AWS::EC2::Instance", 0)
    for lt in resources(template, "AWS::EC2::LaunchTemplate").values():
        (primary,) = lt["Properties"]["LaunchTemplateData"]["NetworkInterfaces"]
        assert "PrivateIpAddress" not in primary and "NetworkInterfaceId" not in primary


def test_one_nat_group_of_one_per_az_in_its_public_subnet(template: Template) -> None:
    # The group replaces a failed NAT; the new one takes the AZ's interface at boot.
    for index, cidr in enumerate(("10.0.0.0/24", "10.0.1.0/24")):
        subnet = logical_id(template, "AWS::EC2::Subnet", {"CidrBlock": cidr})
        template.has_resource_properties(
            "AWS::AutoScaling::AutoScalingGroup",
            {
                "AutoScalingGroupName": f"EipReclaim-Network-nat{index + 1}",
                "MinSize": "1",
                "MaxSize": "1",
                "DesiredCapacity": "1",
                "VPCZoneIdentifier": [{"Ref": subnet}],
                "HealthCheckType": "EC2",
            },
        )
    template.resource_count_is("AWS::AutoScaling::AutoScalingGroup", 2)


def test_a_nat_deploy_waits_for_the_nat_to_be_ready(template: Template) -> None:
    # aws-facts: facts-hook-default-result, facts-creation-policy-signals
    # A NAT whose setup fails must not look healthy: the hook holds it out of service until the boot
    # unit reports, the creation and update policies wait for its signal.
    for group in resources(template, "AWS::AutoScaling::AutoScalingGroup").values():
        assert group["CreationPolicy"] == {"ResourceSignal": {"Count": 1, "Timeout": "PT10M"}}
        policy = group["UpdatePolicy"]["AutoScalingRollingUpdate"]
        assert policy["WaitOnResourceSignals"] is True and policy["MinInstancesInService"] == 0
        (hook,) = group["Properties"]["LifecycleHookSpecificationList"]
        assert hook == {
            "LifecycleHookName": LIFECYCLE_HOOK_NAME,
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "DefaultResult": "ABANDON",
            "HeartbeatTimeout": 600,
        }


def test_nat_addresses_follow_the_subnet_cidr() -> None:
    # aws-facts: facts-subnet-reserved-addresses
    # AWS reserves .0-.3 of every subnet: .4 is the first an instance can hold.
    assert nat_address("10.0.0.0/24") == "10.0.0.4"
    assert nat_address("10.20.0.64/26") == "10.20.0.68"


def nat_user_data(template: Template) -> list[str]:
    """Each NAT launch template's user data, its literal parts joined (tokens dropped)."""
    found = []
    for lt in resources(template, "AWS::EC2::LaunchTemplate").values():
        parts = lt["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Join"][1]
        found.append("".join(p if isinstance(p, str) else "@@" for p in parts))
    return found


def test_nat_launch_templates_give_a_public_ip_and_require_imdsv2(template: Template) -> None:
    # aws-facts: facts-imds-hop-limit
    # The NAT's own egress needs a public IPv4; IMDSv2 with one hop keeps its metadata (and role) away
    # from everything it forwards for.
    template.all_resources_properties(
        "AWS::EC2::LaunchTemplate",
        {
            "LaunchTemplateData": Match.object_like(
                {
                    "MetadataOptions": {
                        "HttpTokens": "required",
                        "HttpEndpoint": "enabled",
                        "HttpPutResponseHopLimit": 1,
                    },
                    "NetworkInterfaces": [
                        {"DeviceIndex": 0, "AssociatePublicIpAddress": True, "Groups": Match.any_value()}
                    ],
                    "BlockDeviceMappings": [
                        Match.object_like({"Ebs": Match.object_like({"Encrypted": True})})
                    ],
                }
            )
        },
    )


def test_nat_image_is_resolved_at_launch(template: Template) -> None:
    # A new AMI needs no deploy: every NAT the group launches boots the current Amazon Linux 2023.
    template.all_resources_properties(
        "AWS::EC2::LaunchTemplate",
        {
            "LaunchTemplateData": Match.object_like(
                {"ImageId": f"resolve:ssm:{AL2023_PARAMETER.format(arch='arm64')}"}
            )
        },
    )


def test_nat_security_group_admits_only_the_vpc(template: Template) -> None:
    # A NAT open to the internet would be an open relay.
    (group,) = resources(template, "AWS::EC2::SecurityGroup").values()
    assert group["Properties"]["SecurityGroupIngress"] == [
        {"CidrIp": "10.0.0.0/16", "IpProtocol": "-1", "Description": "forwarded traffic from inside the VPC"}
    ]


def test_nat_rules_never_forward_link_local(template: Template) -> None:
    # A NAT that forwarded 169.254.169.254 would answer a detoured instance with its own metadata.
    rules = iptables_rules("10.0.0.0/16").splitlines()
    assert rules.index(f"-A FORWARD -d {LINK_LOCAL} -j DROP") < rules.index(
        "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )
    assert ":FORWARD DROP [0:0]" in rules
    assert "-A POSTROUTING -s 10.0.0.0/16 ! -d 10.0.0.0/16 -j MASQUERADE" in rules
    # The NATs carry exactly the setup text the lab applies (rules and sysctls).
    for text in nat_user_data(template):
        assert nat_network_setup("10.0.0.0/16").rstrip("\n") in text


def test_nat_setup_forwards_first_and_turns_redirects_off_everywhere() -> None:
    # Forwarding before anything slow; no ICMP redirect from any interface (all, default, each);
    # loose reverse-path filtering for the second interface in the same subnet.
    lines = nat_network_setup("10.0.0.0/16").splitlines()
    assert lines[1] == "echo 1 > /proc/sys/net/ipv4/ip_forward"
    loop = lines.index("for conf in /proc/sys/net/ipv4/conf/*; do")
    assert lines[loop + 1 : loop + 3] == ['  echo 0 > "$conf/send_redirects"', '  echo 2 > "$conf/rp_filter"']
    assert lines.index("iptables-restore <<'EIP_RECLAIM_RULES'") > loop


def test_nat_boot_is_a_unit_that_runs_at_every_boot(template: Template) -> None:
    # First-boot user data only installs; the unit re-applies everything at every boot, and a rules edit
    # changes the launch template, so it reaches the NATs by replacement.
    for text in nat_user_data(template):
        assert f"cat > /etc/systemd/system/{BOOT_UNIT} <<'EIP_RECLAIM_UNIT'" in text
        assert "WantedBy=multi-user.target" in text
        assert f"systemctl enable --now {BOOT_UNIT}" in text
        # Packages retried; the interface attached at device 1; src/dst check off on the primary too.
        assert "retry dnf install -y iptables-nft" in text
        assert "--device-index 1" in text
        assert "--no-source-dest-check" in text
        # Healthy only after the address is up; a failure marks the NAT unhealthy and abandons it.
        assert text.index("verdict CONTINUE SUCCESS") > text.rindex(f"sh {NETWORK_SCRIPT}")
        assert "--health-status Unhealthy" in text and "verdict ABANDON FAILURE" in text


def test_nat_boot_script_parses_and_shellcheck_is_clean(tmp_path: Path) -> None:
    # The boot script runs on every NAT boot with no one watching: it must at least parse and lint clean.
    import shutil
    import subprocess

    from stacks.nat import _BOOT_SCRIPT

    script = tmp_path / "boot.sh"
    script.write_text(
        _BOOT_SCRIPT.substitute(env_file=ENV_FILE, network_script=NETWORK_SCRIPT, device_index=1)
    )
    subprocess.run(["bash", "-n", str(script)], check=True)
    setup = tmp_path / "network.sh"
    setup.write_text(nat_network_setup("10.0.0.0/16"))
    subprocess.run(["sh", "-n", str(setup)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-x", "-e", "SC1090,SC1091", str(script)], check=True)
        subprocess.run(["shellcheck", "-s", "sh", str(setup)], check=True)


def nat_role_statements(template: Template) -> list[dict[str, Any]]:
    (role,) = [
        r
        for r in resources(template, "AWS::IAM::Role").values()
        if "NAT at 10.0.0.4" in r["Properties"].get("Description", "")
    ]
    (policy,) = role["Properties"]["Policies"]
    return policy["PolicyDocument"]["Statement"]  # type: ignore[no-any-return]


def test_the_nat_role_moves_only_its_own_interface_between_its_own_groups_instances(
    template: Template,
) -> None:
    # Least privilege: attach/detach one interface, onto instances of one group (the reserved tag).
    by_sid = {s.get("Sid", s["Action"]): s for s in nat_role_statements(template)}
    assert set(by_sid) == {
        "FindTheInterface",
        "MoveOnlyThisInterface",
        "SourceDestCheckInItsSubnet",
        "OnlyBetweenThisGroupsInstances",
        "ReportReadiness",
    }
    # The primary's source/dest check by interface id, never the instance-wide call (refused once the
    # stable interface is attached): interfaces of its own subnet only. aws-facts: nat-modify-eni-scope
    check = by_sid["SourceDestCheckInItsSubnet"]
    assert check["Action"] == "ec2:ModifyNetworkInterfaceAttribute"
    assert check["Resource"]["Fn::Join"][1][-1] == ":network-interface/*"
    (subnet_arn,) = check["Condition"]["ArnEquals"].values()
    assert list(check["Condition"]["ArnEquals"]) == ["ec2:Subnet"]
    assert subnet_arn["Fn::Join"][1][-2] == ":subnet/"
    assert "PublicSubnet1" in subnet_arn["Fn::Join"][1][-1]["Ref"]
    assert "ec2:ModifyInstanceAttribute" not in json.dumps(nat_role_statements(template))
    interface = by_sid["MoveOnlyThisInterface"]
    assert interface["Action"] == ["ec2:AttachNetworkInterface", "ec2:DetachNetworkInterface"]
    assert interface["Resource"]["Fn::Join"][1][-2:] == [
        ":network-interface/",
        {"Ref": Match.any_value()},
    ] or (interface["Resource"]["Fn::Join"][1][-2] == ":network-interface/")
    instances = by_sid["OnlyBetweenThisGroupsInstances"]
    assert "ec2:ModifyNetworkInterfaceAttribute" in instances["Action"]
    assert instances["Condition"] == {
        "StringEquals": {"aws:ResourceTag/aws:autoscaling:groupName": "EipReclaim-Network-nat1"}
    }
    assert instances["Resource"]["Fn::Join"][1][-1] == ":instance/*"
    assert by_sid["FindTheInterface"] == {
        "Sid": "FindTheInterface",
        "Action": "ec2:DescribeNetworkInterfaces",
        "Effect": "Allow",
        "Resource": "*",
    }


def test_private_subnets_route_through_the_nat_interface_in_their_own_az(template: Template) -> None:
    # Cross-AZ NAT would break with its AZ; each private subnet routes to its AZ's stable interface,
    # so a NAT replacement touches no route.
    for index, cidr in enumerate(("10.0.2.0/24", "10.0.3.0/24")):
        subnet = logical_id(template, "AWS::EC2::Subnet", {"CidrBlock": cidr})
        association = resources(
            template, "AWS::EC2::SubnetRouteTableAssociation", {"SubnetId": {"Ref": subnet}}
        )
        (assoc,) = association.values()
        table = assoc["Properties"]["RouteTableId"]
        interface = logical_id(
            template, "AWS::EC2::NetworkInterface", {"PrivateIpAddress": f"10.0.{index}.4"}
        )
        template.has_resource_properties(
            "AWS::EC2::Route",
            {
                "RouteTableId": table,
                "DestinationCidrBlock": "0.0.0.0/0",
                "NetworkInterfaceId": {"Ref": interface},
            },
        )


def test_the_s3_gateway_endpoint_is_on_every_route_table(template: Template) -> None:
    # The healed instance fetches its payload from S3 before it has any public address.
    tables = [{"Ref": t} for t in sorted(resources(template, "AWS::EC2::RouteTable"))]
    template.has_resource_properties(
        "AWS::EC2::VPCEndpoint",
        {
            "VpcEndpointType": "Gateway",
            "ServiceName": {"Fn::Join": ["", ["com.amazonaws.", {"Ref": "AWS::Region"}, ".s3"]]},
            "RouteTableIds": Match.array_with(tables),
        },
    )
    (endpoint,) = resources(template, "AWS::EC2::VPCEndpoint").values()
    assert len(endpoint["Properties"]["RouteTableIds"]) == len(tables) == 4


def test_flow_logs_capture_all_traffic_with_bounded_retention(template: Template) -> None:
    # Who talked to the NATs and the addresses, kept as long as configured and no longer.
    group = logical_id(template, "AWS::Logs::LogGroup", {"RetentionInDays": 30})
    template.has_resource_properties(
        "AWS::EC2::FlowLog",
        {
            "ResourceType": "VPC",
            "TrafficType": "ALL",
            "LogDestinationType": "cloud-watch-logs",
            "LogGroupName": {"Ref": group},
        },
    )


def test_flow_logs_are_encrypted_and_kept_when_the_stack_goes(template: Template) -> None:
    # checkov CKV_AWS_158; the record outlives the network, and so does the key that reads it.
    key = logical_id(template, "AWS::KMS::Key", {"EnableKeyRotation": True})
    template.has_resource(
        "AWS::Logs::LogGroup",
        {
            "Properties": Match.object_like({"KmsKeyId": {"Fn::GetAtt": [key, "Arn"]}}),
            "DeletionPolicy": "Retain",
            "UpdateReplacePolicy": "Retain",
        },
    )
    template.has_resource("AWS::KMS::Key", {"DeletionPolicy": "Retain"})


def test_nat_status_and_in_service_alarms_reach_the_topic(template: Template) -> None:
    # The group replaces an impaired NAT by itself; the team still hears that it had to.
    topic = logical_id(template, "AWS::SNS::Topic", {"DisplayName": "eip-reclaim alerts"})
    for index in (1, 2):
        group = f"EipReclaim-Network-nat{index}"
        for metric, namespace in (
            ("StatusCheckFailed", "AWS/EC2"),
            ("GroupInServiceInstances", "AWS/AutoScaling"),
        ):
            template.has_resource_properties(
                "AWS::CloudWatch::Alarm",
                {
                    "MetricName": metric,
                    "Namespace": namespace,
                    "Dimensions": [{"Name": "AutoScalingGroupName", "Value": group}],
                    "Period": 60,
                    "AlarmActions": [{"Ref": topic}],
                },
            )


def test_one_encrypted_topic_per_app_that_failed_nat_launches_reach(template: Template) -> None:
    # aws-facts: alerts-customer-managed-key
    # The one thing a team subscribes to, encrypted with the app's key; what each publisher may do on the
    # topic and the key is tested in tests/unit/test_alerts.py.
    key = logical_id(template, "AWS::KMS::Key", {"EnableKeyRotation": True})
    template.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": {"Fn::GetAtt": [key, "Arn"]}})
    template.resource_count_is("AWS::SNS::Topic", 1)
    # Failed NAT launches go to it as well.
    template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {
                "source": ["aws.autoscaling"],
                "detail-type": ["EC2 Instance Launch Unsuccessful"],
                "detail": {"AutoScalingGroupName": ["EipReclaim-Network-nat1", "EipReclaim-Network-nat2"]},
            },
            "Targets": [{"Arn": {"Ref": topic_id(template)}, "Id": "AlertTopic"}],
        },
    )


def topic_id(template: Template) -> str:
    return logical_id(template, "AWS::SNS::Topic", {"DisplayName": "eip-reclaim alerts"})


def test_the_dashboard_shows_heals_per_service_from_the_payloads_metrics(template: Template) -> None:
    # SEARCH over the payload's namespace: a service added later appears without a deploy here.
    (dashboard,) = resources(template, "AWS::CloudWatch::Dashboard").values()
    parts = dashboard["Properties"]["DashboardBody"]["Fn::Join"][1]
    body = json.loads("".join(p if isinstance(p, str) else "@@" for p in parts))
    expressions = [m[0]["expression"] for w in body["widgets"] for m in w["properties"]["metrics"]]
    for metric in (HEALED, HEAL_SECONDS):
        assert any(
            e.startswith(f"SEARCH('{{{METRICS_NAMESPACE},Service}} MetricName=\"{metric}\"'")
            for e in expressions
        )


def test_an_existing_topic_is_used_instead_of_a_new_one() -> None:
    # A team with its own on-call topic points the app at it: no topic, no topic policy created.
    raw = dict(DEFAULT_RAW, alarm_topic_arn="arn:aws:sns:ap-southeast-2:123456789012:oncall")
    with tempfile.TemporaryDirectory() as outdir:
        built = synthesize(raw, Path(outdir))
        network = built.template(built.network)
        network.resource_count_is("AWS::SNS::Topic", 0)
        alarms = resources(network, "AWS::CloudWatch::Alarm").values()
        assert alarms and all(
            a["Properties"]["AlarmActions"] == ["arn:aws:sns:ap-southeast-2:123456789012:oncall"]
            for a in alarms
        )
        service = built.template(built.service)
        assert "arn:aws:sns:ap-southeast-2:123456789012:oncall" in json.dumps(service.to_json())


def test_no_lambda_and_no_nat_gateway(app: Synthesized) -> None:
    # The product's promise: no Lambda, no poller; NAT instances, not per-hour NAT gateways.
    for name, body in app.templates().items():
        types = {r["Type"] for r in body["Resources"].values()}
        assert not types & {
            "AWS::Lambda::Function",
            "AWS::EC2::NatGateway",
            "AWS::ElasticLoadBalancingV2::LoadBalancer",
        }, name


def test_three_azs_when_configured() -> None:
    # az_count above two still needs no lookup: the stack selects from the deploy region's list.
    multi = multi_app()
    template = multi.template(multi.network)
    template.resource_count_is("AWS::AutoScaling::AutoScalingGroup", 3)
    template.has_resource_properties(
        "AWS::EC2::Subnet", {"AvailabilityZone": {"Fn::Select": [2, {"Fn::GetAZs": ""}]}}
    )
    # A t3 NAT runs the x86_64 image.
    template.all_resources_properties(
        "AWS::EC2::LaunchTemplate",
        {
            "LaunchTemplateData": Match.object_like(
                {
                    "ImageId": f"resolve:ssm:{AL2023_PARAMETER.format(arch='x86_64')}",
                    "InstanceType": "t3.nano",
                }
            )
        },
    )
    for nat_ip in ("10.20.0.4", "10.20.0.68", "10.20.0.132"):
        template.has_resource_properties("AWS::EC2::NetworkInterface", {"PrivateIpAddress": nat_ip})


def _by_type(body: dict[str, Any], *types: str) -> dict[str, Any]:
    return {k: r for k, r in body["Resources"].items() if r["Type"] in types}


@pytest.mark.parametrize("change", ["nat_instance_type", "nat_boot_text"])
def test_replacing_the_nats_touches_no_interface_route_or_service_map(
    app: Synthesized, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # arm64 -> x86_64 (a new image) or a new boot text: only the NATs' launch templates change (the
    # groups roll their instances); the interfaces, the routes and every service stack stay as they are.
    from stacks import nat

    raw = dict(DEFAULT_RAW)
    if change == "nat_instance_type":
        raw["network"] = dict(DEFAULT_RAW["network"], nat_instance_type="t3.nano")
    else:
        original = nat.nat_network_setup
        monkeypatch.setattr(nat, "nat_network_setup", lambda cidr: original(cidr) + "# edited\n")
    with tempfile.TemporaryDirectory() as outdir:
        changed = synthesize(raw, Path(outdir))
        before, after = app.template_json(app.network), changed.template_json(changed.network)
        stable = ("AWS::EC2::NetworkInterface", "AWS::EC2::Route", "AWS::EC2::Subnet", "AWS::EC2::RouteTable")
        assert _by_type(after, *stable) == _by_type(before, *stable)
        assert before["Outputs"] == after["Outputs"]
        assert app.template_json(app.service) == changed.template_json(changed.service)
        diff = {k for k in before["Resources"] if before["Resources"][k] != after["Resources"].get(k)}
        assert diff and all(before["Resources"][k]["Type"] == "AWS::EC2::LaunchTemplate" for k in diff)
