"""The three network choices (`network.egress`) and a team's own VPC: what each creates, and what not."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_cdk.assertions import Match

from bootstrap.config import parse_config
from stacks.config import parse
from tests.unit.cdk_app import (
    BYO_RAWS,
    BYO_VPC,
    DEFAULT_RAW,
    Synthesized,
    byo_app,
    endpoints_app,
    ipv6_app,
    synthesize,
)
from tests.unit.test_healing_service import ALLOCATION, as_deployed, payload_config_of, statements

# What a NAT of any kind leaves in a template: a NAT instance's stable interface, its group of one,
# its launch template, a bare instance, a managed NAT gateway, a route through an interface.
NAT_TYPES = (
    "AWS::EC2::NetworkInterface",
    "AWS::AutoScaling::AutoScalingGroup",
    "AWS::EC2::LaunchTemplate",
    "AWS::EC2::Instance",
    "AWS::EC2::NatGateway",
)
BYO_SUBNETS = [s["subnet_id"] for s in BYO_VPC["public_subnets"]]
BYO_ROUTE_TABLE = BYO_VPC["public_subnets"][0]["route_table_id"]
PRIVATE_DNS_SERVICES = ("ec2", "autoscaling", "cloudformation", "monitoring")


def of_type(body: dict[str, Any], type_: str) -> dict[str, Any]:
    return {k: r for k, r in body["Resources"].items() if r["Type"] == type_}


def subnet_ids(body: dict[str, Any], kind: str) -> list[str]:
    return [
        k
        for k, r in of_type(body, "AWS::EC2::Subnet").items()
        if {"Key": "aws-cdk:subnet-type", "Value": kind} in r["Properties"]["Tags"]
    ]


def route_table_of(body: dict[str, Any], subnet: str) -> str:
    (table,) = [
        r["Properties"]["RouteTableId"]["Ref"]
        for r in of_type(body, "AWS::EC2::SubnetRouteTableAssociation").values()
        if r["Properties"]["SubnetId"] == {"Ref": subnet}
    ]
    return str(table)


def routes_of(body: dict[str, Any], table: str) -> list[dict[str, Any]]:
    return [
        r["Properties"]
        for r in of_type(body, "AWS::EC2::Route").values()
        if r["Properties"]["RouteTableId"] == {"Ref": table}
    ]


def service_of(endpoint: dict[str, Any]) -> str:
    """The service an endpoint is for: the last label of com.amazonaws.<region>.<service>."""
    return json.dumps(endpoint["ServiceName"]).rsplit(".", 1)[-1].strip('"]}')


def assert_no_nat(app: Synthesized) -> None:
    """No NAT instance, NAT interface, NAT group, NAT gateway, NAT alarm or NAT event rule anywhere."""
    network = app.template_json(app.network)
    for type_ in NAT_TYPES:
        assert not of_type(network, type_), type_
    text = json.dumps(network)
    assert "-nat1" not in text and "StatusCheckFailed" not in text
    assert not of_type(network, "AWS::Events::Rule")
    assert not of_type(network, "AWS::CloudWatch::Alarm")
    assert app.stacks.network.network.nat_instances == []
    for body in app.templates().values():
        assert not any(
            "NetworkInterfaceId" in r["Properties"] for r in of_type(body, "AWS::EC2::Route").values()
        )


def service_config(app: Synthesized) -> dict[str, Any]:
    """The payload configuration that the service's user data writes, with deploy-time stand-ins."""
    return payload_config_of(app.template(app.service), app.template_json(app.network))


def validated(config: dict[str, Any]) -> Any:
    """What the payload's own validator makes of it (subnet ids as a deploy fills them in)."""
    return parse_config(as_deployed(config))


# ---- ipv6 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def six() -> Synthesized:
    return ipv6_app()


def test_ipv6_a_dual_stack_vpc_with_a_64_per_subnet(six: Synthesized) -> None:
    # An Amazon-provided block; every subnet gets one /64 of it and hands out IPv6 addresses.
    network = six.template(six.network)
    network.has_resource_properties("AWS::EC2::VPCCidrBlock", {"AmazonProvidedIpv6CidrBlock": True})
    subnets = of_type(six.template_json(six.network), "AWS::EC2::Subnet").values()
    assert len(subnets) == 4
    for subnet in subnets:
        props = subnet["Properties"]
        assert props["Ipv6CidrBlock"]["Fn::Select"][1]["Fn::Cidr"][2] == "64"
        assert props["AssignIpv6AddressOnCreation"] is True
        # Still no public IPv4 by accident: the instance must boot without one.
        assert props["MapPublicIpOnLaunch"] is False


def test_ipv6_public_subnets_route_ipv6_to_the_internet_gateway(six: Synthesized) -> None:
    # The instance's way to EC2's dual-stack endpoint before it holds its address.
    body = six.template_json(six.network)
    (igw,) = of_type(body, "AWS::EC2::InternetGateway")
    for subnet in subnet_ids(body, "Public"):
        routes = routes_of(body, route_table_of(body, subnet))
        assert {"DestinationIpv6CidrBlock": "::/0", "GatewayId": {"Ref": igw}} in [
            {k: v for k, v in r.items() if k != "RouteTableId"} for r in routes
        ]


def test_ipv6_private_subnets_get_ipv6_egress_only_and_no_ipv4_route(six: Synthesized) -> None:
    # The egress-only gateway is their one way out (documented: they lose IPv4 egress).
    body = six.template_json(six.network)
    (eigw,) = of_type(body, "AWS::EC2::EgressOnlyInternetGateway")
    for subnet in subnet_ids(body, "Private"):
        routes = routes_of(body, route_table_of(body, subnet))
        assert [{k: v for k, v in r.items() if k != "RouteTableId"} for r in routes] == [
            {"DestinationIpv6CidrBlock": "::/0", "EgressOnlyInternetGatewayId": {"Ref": eigw}}
        ]


def test_ipv6_has_no_nat_of_any_kind(six: Synthesized) -> None:
    # The point of the mode: nothing to run, patch or pay for per hour.
    assert_no_nat(six)
    six.template(six.network).resource_count_is("AWS::EC2::VPCEndpoint", 1)  # S3 only


def test_ipv6_instances_get_one_ipv6_address_and_may_leave_over_ipv6(six: Synthesized) -> None:
    # Without an IPv6 address, or with IPv6 egress blocked by its own group, the instance has no way out.
    service = six.template(six.service)
    service.has_resource_properties(
        "AWS::EC2::LaunchTemplate",
        {
            "LaunchTemplateData": Match.object_like(
                {
                    "NetworkInterfaces": [
                        {
                            "DeviceIndex": 0,
                            "AssociatePublicIpAddress": False,
                            "Ipv6AddressCount": 1,
                            "Groups": Match.any_value(),
                        }
                    ],
                    # IMDS stays on IPv4 (no HttpProtocolIpv6), IMDSv2 only.
                    "MetadataOptions": {
                        "HttpEndpoint": "enabled",
                        "HttpTokens": "required",
                        "HttpPutResponseHopLimit": 1,
                    },
                }
            )
        },
    )
    service.has_resource_properties(
        "AWS::EC2::SecurityGroup",
        {
            "SecurityGroupEgress": Match.array_with(
                [Match.object_like({"CidrIpv6": "::/0", "IpProtocol": "-1"})]
            )
        },
    )


def test_ipv6_payload_goes_direct_over_the_dual_stack_endpoint(six: Synthesized) -> None:
    # `direct` + `dualstack`, no NAT map; the payload's own validator accepts the file.
    config = service_config(six)
    assert (config["egress"], config["dualstack"]) == ("direct", True)
    assert "nat_by_subnet" not in config
    parsed = validated(config)
    assert (parsed.egress, parsed.dualstack, dict(parsed.nat_by_subnet)) == ("direct", True, {})
    assert parsed.allocation_id == ALLOCATION


# ---- interface-endpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private() -> Synthesized:
    return endpoints_app()


def test_endpoints_for_every_api_the_payload_calls_with_private_dns(private: Synthesized) -> None:
    # EC2, Auto Scaling, CloudFormation (signals) and CloudWatch (metrics), by their usual names.
    body = private.template_json(private.network)
    public = sorted(subnet_ids(body, "Public"))
    (group,) = of_type(body, "AWS::EC2::SecurityGroup")
    found = {}
    for endpoint in of_type(body, "AWS::EC2::VPCEndpoint").values():
        props = endpoint["Properties"]
        if props.get("VpcEndpointType") != "Interface":
            continue
        found[service_of(props)] = props
        assert props["PrivateDnsEnabled"] is True
        # One network interface per AZ, in the public subnets where the service instances boot.
        assert sorted(s["Ref"] for s in props["SubnetIds"]) == public
        assert props["SecurityGroupIds"] == [{"Fn::GetAtt": [group, "GroupId"]}]
    assert sorted(found) == sorted(PRIVATE_DNS_SERVICES), found.keys()


def test_endpoints_admit_https_from_the_vpc_only(private: Synthesized) -> None:
    # Nothing outside the VPC talks to them; they open no connection themselves.
    (group,) = of_type(private.template_json(private.network), "AWS::EC2::SecurityGroup").values()
    assert group["Properties"]["SecurityGroupIngress"] == [
        {
            "CidrIp": "10.0.0.0/16",
            "Description": "API calls from inside the VPC",
            "FromPort": 443,
            "IpProtocol": "tcp",
            "ToPort": 443,
        }
    ]
    assert all(rule["CidrIp"] == "255.255.255.255/32" for rule in group["Properties"]["SecurityGroupEgress"])


def test_endpoints_need_the_vpcs_dns_support_and_hostnames(private: Synthesized) -> None:
    # Private DNS works only with both on.
    private.template(private.network).has_resource_properties(
        "AWS::EC2::VPC", {"EnableDnsSupport": True, "EnableDnsHostnames": True}
    )


def test_endpoints_mode_has_no_nat_and_isolated_private_subnets(private: Synthesized) -> None:
    # No NAT; the private subnets have no route out of the VPC at all (only the S3 gateway endpoint).
    assert_no_nat(private)
    body = private.template_json(private.network)
    assert subnet_ids(body, "Private") == [] and len(subnet_ids(body, "Isolated")) == 3
    for subnet in subnet_ids(body, "Isolated"):
        assert routes_of(body, route_table_of(body, subnet)) == []


def test_endpoints_payload_goes_direct(private: Synthesized) -> None:
    # `direct`, no dual-stack, no NAT map; valid for the payload.
    config = service_config(private)
    assert config["egress"] == "direct" and "dualstack" not in config and "nat_by_subnet" not in config
    parsed = validated(config)
    assert (parsed.egress, parsed.dualstack) == ("direct", False)


# ---- nat-instances with the other NAT strategy --------------------------------------------------------


def test_a_team_may_pick_the_main_table_detour(tmp_path: Any) -> None:
    # network.nat_egress reaches the payload as its egress; the NATs stay exactly as they are.
    raw = json.loads(json.dumps(DEFAULT_RAW))
    raw["network"]["nat_egress"] = "main-table"
    built = synthesize(raw, tmp_path)
    config = service_config(built)
    assert config["egress"] == "main-table" and len(config["nat_by_subnet"]) == 2
    assert validated(config).egress == "main-table"


# ---- a team's own VPC ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(BYO_RAWS))
def own(request: pytest.FixtureRequest) -> Synthesized:
    return byo_app(request.param)


def test_own_vpc_creates_no_vpc_subnet_route_table_or_gateway(own: Synthesized) -> None:
    # The team's network stays theirs: the app adds only what the mode needs and the VPC lacks.
    body = own.template_json(own.network)
    for type_ in (
        "AWS::EC2::VPC",
        "AWS::EC2::Subnet",
        "AWS::EC2::RouteTable",
        "AWS::EC2::Route",
        "AWS::EC2::InternetGateway",
        "AWS::EC2::EgressOnlyInternetGateway",
        "AWS::EC2::VPCCidrBlock",
    ):
        assert not of_type(body, type_), type_
    # Literal ids: nothing exported, nothing imported.
    assert "Export" not in json.dumps(body.get("Outputs", {}))
    assert "Fn::ImportValue" not in json.dumps(own.template_json(own.service))


def test_own_vpc_the_group_uses_the_named_subnets_and_iam_names_the_vpc(own: Synthesized) -> None:
    # The group spans the team's public subnets; the interface grant stays limited to that VPC.
    service = own.template(own.service)
    group = next(iter(service.find_resources("AWS::AutoScaling::AutoScalingGroup").values()))
    assert group["Properties"]["VPCZoneIdentifier"] == BYO_SUBNETS
    (statement,) = [s for s in statements(service) if s.get("Sid") == "ThroughInterfacesOfThisVpc"]
    (vpc_arn,) = statement["Condition"]["StringEquals"].values()
    assert vpc_arn["Fn::Join"][1][-1] == f":vpc/{BYO_VPC['vpc_id']}"


def test_own_vpc_flow_log_on_that_vpc(own: Synthesized) -> None:
    # The app's flow log records the team's VPC (a second one beside theirs, if they have one).
    own.template(own.network).has_resource_properties(
        "AWS::EC2::FlowLog", {"ResourceId": BYO_VPC["vpc_id"], "ResourceType": "VPC"}
    )


def test_own_vpc_with_nat_instances_adds_only_the_nats_and_the_s3_endpoint() -> None:
    # NATs at the fifth address of each named public subnet; the map names the literal subnet ids.
    built = byo_app("nat-instances")
    network = built.template(built.network)
    for subnet, address in zip(BYO_SUBNETS, ("172.31.0.4", "172.31.16.4"), strict=True):
        network.has_resource_properties(
            "AWS::EC2::NetworkInterface", {"SubnetId": subnet, "PrivateIpAddress": address}
        )
    network.resource_count_is("AWS::AutoScaling::AutoScalingGroup", 2)
    network.has_resource_properties(
        "AWS::EC2::SecurityGroup",
        {"SecurityGroupIngress": [Match.object_like({"CidrIp": BYO_VPC["vpc_cidr"], "IpProtocol": "-1"})]},
    )
    # The S3 gateway endpoint once on the shared public route table; no interface endpoint.
    network.resource_count_is("AWS::EC2::VPCEndpoint", 1)
    network.has_resource_properties(
        "AWS::EC2::VPCEndpoint", {"VpcId": BYO_VPC["vpc_id"], "RouteTableIds": [BYO_ROUTE_TABLE]}
    )
    config = service_config(built)
    assert config["nat_by_subnet"] == dict(zip(BYO_SUBNETS, ("172.31.0.4", "172.31.16.4"), strict=True))
    assert validated(config).egress == "policy-route"


def test_own_vpc_with_ipv6_adds_no_nat_and_no_interface_endpoint() -> None:
    # The subnets are the team's dual-stack ones (stated, not checked); the instances ask for an address.
    built = byo_app("ipv6")
    assert_no_nat(built)
    built.template(built.network).resource_count_is("AWS::EC2::VPCEndpoint", 1)  # S3 only
    built.template(built.service).has_resource_properties(
        "AWS::EC2::LaunchTemplate",
        {
            "LaunchTemplateData": Match.object_like(
                {"NetworkInterfaces": [Match.object_like({"Ipv6AddressCount": 1})]}
            )
        },
    )
    parsed = validated(service_config(built))
    assert (parsed.egress, parsed.dualstack) == ("direct", True)


def test_own_vpc_with_endpoints_adds_only_the_missing_ones() -> None:
    # EC2, Auto Scaling and S3 exist already (a second private-DNS endpoint would collide): only
    # CloudFormation and CloudWatch are added, in the named subnets.
    built = byo_app("interface-endpoints")
    assert_no_nat(built)
    endpoints = of_type(built.template_json(built.network), "AWS::EC2::VPCEndpoint").values()
    names = sorted(
        json.dumps(e["Properties"]["ServiceName"]).rsplit(".", 1)[-1].strip('"]}') for e in endpoints
    )
    assert names == ["cloudformation", "monitoring"]
    for endpoint in endpoints:
        assert endpoint["Properties"]["SubnetIds"] == BYO_SUBNETS
        assert endpoint["Properties"]["VpcEndpointType"] == "Interface"
    assert validated(service_config(built)).egress == "direct"


def test_own_vpc_synthesizes_without_an_account() -> None:
    # Nothing is looked up: the config states what a lookup would have found (and what it cannot: IPv6
    # blocks, existing endpoints).
    config = parse(BYO_RAWS["interface-endpoints"])
    assert config.network.vpc_id == BYO_VPC["vpc_id"]
    assert config.network.az_count == 2
    assert config.network.endpoints_to_add == ("cloudformation", "monitoring")
