"""NetworkStack: the VPC, its subnets, NAT instances at stable addresses, S3 endpoint and flow logs."""

from __future__ import annotations

from typing import Any

import pytest
from aws_cdk.assertions import Match, Template

from stacks.nat import LINK_LOCAL, iptables_rules, nat_address
from tests.unit.cdk_app import Synthesized, default_app, multi_app


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


def test_one_nat_instance_per_az_at_the_fifth_address_of_its_public_subnet(template: Template) -> None:
    # The address depends only on the subnet's CIDR, so a recovered or rebuilt NAT comes back at it.
    for cidr, nat_ip in (("10.0.0.0/24", "10.0.0.4"), ("10.0.1.0/24", "10.0.1.4")):
        subnet = logical_id(template, "AWS::EC2::Subnet", {"CidrBlock": cidr})
        template.has_resource_properties(
            "AWS::EC2::Instance",
            {
                "NetworkInterfaces": [
                    {
                        "DeviceIndex": "0",
                        "SubnetId": {"Ref": subnet},
                        "PrivateIpAddress": nat_ip,
                        "AssociatePublicIpAddress": True,
                        "GroupSet": Match.any_value(),
                    }
                ]
            },
        )
    template.resource_count_is("AWS::EC2::Instance", 2)


def test_nat_addresses_follow_the_subnet_cidr() -> None:
    # AWS reserves .0-.3 of every subnet: .4 is the first an instance can hold.
    assert nat_address("10.0.0.0/24") == "10.0.0.4"
    assert nat_address("10.20.0.64/26") == "10.20.0.68"


def test_nat_instances_forward_and_require_imdsv2(template: Template) -> None:
    # Source/dest check off or the NAT drops forwarded packets; IMDSv2 with one hop keeps its metadata
    # (and role) away from everything it forwards for.
    template.all_resources_properties(
        "AWS::EC2::Instance",
        {
            "SourceDestCheck": False,
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpEndpoint": "enabled",
                "HttpPutResponseHopLimit": 1,
            },
            "BlockDeviceMappings": [Match.object_like({"Ebs": Match.object_like({"Encrypted": True})})],
        },
    )


def test_nat_image_is_resolved_at_launch_so_a_new_ami_never_replaces_a_nat(template: Template) -> None:
    # A replacement would need the fixed address while the old NAT still holds it.
    template.all_resources_properties(
        "AWS::EC2::Instance",
        {"ImageId": "resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64"},
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
    # The instances carry exactly these rules in their user data.
    for instance in resources(template, "AWS::EC2::Instance").values():
        assert iptables_rules("10.0.0.0/16") in instance["Properties"]["UserData"]["Fn::Base64"]
        assert "net.ipv4.ip_forward = 1" in instance["Properties"]["UserData"]["Fn::Base64"]


def test_private_subnets_route_through_the_nat_in_their_own_az(template: Template) -> None:
    # Cross-AZ NAT would break with its AZ; each private subnet uses its AZ's NAT instance.
    for index, cidr in enumerate(("10.0.2.0/24", "10.0.3.0/24")):
        subnet = logical_id(template, "AWS::EC2::Subnet", {"CidrBlock": cidr})
        association = resources(
            template, "AWS::EC2::SubnetRouteTableAssociation", {"SubnetId": {"Ref": subnet}}
        )
        (assoc,) = association.values()
        table = assoc["Properties"]["RouteTableId"]
        nat = logical_id(
            template,
            "AWS::EC2::Instance",
            {"NetworkInterfaces": [Match.object_like({"PrivateIpAddress": f"10.0.{index}.4"})]},
        )
        template.has_resource_properties(
            "AWS::EC2::Route",
            {"RouteTableId": table, "DestinationCidrBlock": "0.0.0.0/0", "InstanceId": {"Ref": nat}},
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


@pytest.mark.parametrize(
    ("metric", "action"), [("StatusCheckFailed_System", "recover"), ("StatusCheckFailed_Instance", "reboot")]
)
def test_each_nat_recovers_in_place(template: Template, metric: str, action: str) -> None:
    # Recover and reboot keep the instance, its ENI and so its private address: no map goes stale.
    for nat in resources(template, "AWS::EC2::Instance"):
        template.has_resource_properties(
            "AWS::CloudWatch::Alarm",
            {
                "MetricName": metric,
                "Namespace": "AWS/EC2",
                "Dimensions": [{"Name": "InstanceId", "Value": {"Ref": nat}}],
                "Period": 60,
                "EvaluationPeriods": 3,
                "AlarmActions": [
                    {
                        "Fn::Join": [
                            "",
                            [
                                "arn:",
                                {"Ref": "AWS::Partition"},
                                ":automate:",
                                {"Ref": "AWS::Region"},
                                f":ec2:{action}",
                            ],
                        ]
                    }
                ],
            },
        )


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
    template.resource_count_is("AWS::EC2::Instance", 3)
    template.has_resource_properties(
        "AWS::EC2::Subnet", {"AvailabilityZone": {"Fn::Select": [2, {"Fn::GetAZs": ""}]}}
    )
    # A t3 NAT runs the x86_64 image.
    template.all_resources_properties(
        "AWS::EC2::Instance",
        {
            "ImageId": "resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
            "InstanceType": "t3.nano",
        },
    )
    for nat_ip in ("10.20.0.4", "10.20.0.68", "10.20.0.132"):
        template.has_resource_properties(
            "AWS::EC2::Instance", {"NetworkInterfaces": [Match.object_like({"PrivateIpAddress": nat_ip})]}
        )
