"""The configuration: defaults, what a user can set, and one clear line for every bad value."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ec2 as ec2

from stacks.config import (
    ConfigError,
    HealthCheckConfig,
    NetworkConfig,
    ServiceConfig,
    from_context,
    is_graviton,
    parse,
)
from stacks.nat import StableNatProvider
from stacks.payload_config import DIRECT, payload_config
from stacks.service import HealingService
from stacks.service_network import Egress
from tests.unit.cdk_app import BYO_RAWS, BYO_VPC, DEFAULT_RAW, FEATURE_FLAGS, MULTI_RAW, REPO


def with_change(path: str, value: object) -> dict[str, Any]:
    """The default configuration with one value replaced (`a.b[0].c` style paths)."""
    raw = copy.deepcopy(DEFAULT_RAW)
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    node: Any = raw
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value
    return raw


def test_the_embedded_default_is_two_azs_and_one_service() -> None:
    # The default in cdk.json must synthesize anywhere: two AZs, one service, nothing account-specific.
    config = parse(DEFAULT_RAW)
    assert config.network == NetworkConfig()
    assert config.network.az_count == 2
    assert [s.name for s in config.services] == ["web"]
    assert config.services[0].allocation_id is None


def test_an_empty_object_means_all_defaults() -> None:
    # Every key has a default: a user states only what differs.
    config = parse({})
    assert config.stack_prefix == "EipReclaim"
    assert config.services == (ServiceConfig(name="web"),)


def test_several_services_share_one_network_and_one_adopts_an_address() -> None:
    # Each service has its own name, address, type and ports; an allocation id adopts an existing address.
    config = parse(MULTI_RAW)
    web, smtp = config.services
    assert (web.name, web.ingress_ports, web.adopts_address) == ("web", (80, 443), False)
    assert (smtp.instance_type, smtp.ingress_cidr, smtp.allocation_id) == (
        "t3.small",
        "192.0.2.0/24",
        "eipalloc-0123456789abcdef0",
    )
    assert config.network.az_count == 3


def test_the_payload_is_bundled_for_amazon_linux_2023s_python_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The instance runs the AMI's own python3 (3.9 on AL2023); a newer AMI's can be named instead.
    from aws_cdk import App

    from stacks import assembly
    from stacks.bundle import BundleInfo

    assert parse(DEFAULT_RAW).payload_python_version == "3.9"
    config = parse(with_change("payload_python_version", "3.11"))
    asked: list[str] = []

    def fake_build_bundle(*, python_version: str) -> BundleInfo:
        asked.append(python_version)
        path = REPO / "cdk.json"  # any file: the stacks only stage it
        return BundleInfo(path=path, sha256="0" * 64, size=1, file_count=1, input_hash="x")

    monkeypatch.setattr(assembly, "build_bundle", fake_build_bundle)
    stacks = assembly.build(App(), parse(MULTI_RAW), checks=False)
    assembly.build(App(), config, checks=False)
    # Built once per app, whatever the number of services, for the configured version.
    assert asked == ["3.9", "3.11"]
    for stack in stacks.services:  # each service installs that one bundle
        assert f"bundle_sha256='{'0' * 64}'" in json.dumps(
            stack.resolve(stack.healing_group.user_data.render())
        )


def test_the_default_network_is_nat_instances_with_policy_routing() -> None:
    # Today's network stays the default; the payload is told its strategy explicitly.
    network = parse(DEFAULT_RAW).network
    assert (network.egress, network.nat_egress, network.vpc_id) == ("nat-instances", "policy-route", None)
    assert (network.payload_egress, network.payload_dualstack) == ("policy-route", False)
    assert parse(with_change("network.nat_egress", "main-table")).network.payload_egress == "main-table"


@pytest.mark.parametrize(
    ("egress", "payload", "dualstack", "endpoints"),
    [
        ("ipv6", "direct", True, ()),
        ("interface-endpoints", "direct", False, ("ec2", "autoscaling", "cloudformation", "monitoring")),
    ],
)
def test_the_nat_free_networks_tell_the_payload_to_go_direct(
    egress: str, payload: str, dualstack: bool, endpoints: tuple[str, ...]
) -> None:
    # What each network mode means for the payload's file and for the endpoints the app adds.
    network = parse({"network": {"egress": egress}}).network
    assert (network.payload_egress, network.payload_dualstack) == (payload, dualstack)
    assert network.endpoints_to_add == endpoints
    assert not network.uses_nat_instances


def test_a_teams_own_vpc_is_stated_not_looked_up() -> None:
    # Ids, CIDRs, AZs and route tables from the configuration; the AZ count is the subnets'.
    network = parse(BYO_RAWS["interface-endpoints"]).network
    assert network.vpc_id == BYO_VPC["vpc_id"] and network.cidr == "172.31.0.0/16"
    assert network.az_count == 2 and network.is_existing_vpc
    assert [s.subnet_id for s in network.public_subnets] == [
        s["subnet_id"] for s in BYO_VPC["public_subnets"]
    ]
    assert network.existing_endpoints == {"s3", "ec2", "autoscaling"}
    assert network.endpoints_to_add == ("cloudformation", "monitoring")


def byo_with(**changes: object) -> dict[str, Any]:
    """The own-VPC configuration (nat-instances) with network keys replaced; None removes a key."""
    raw = copy.deepcopy(BYO_RAWS["nat-instances"])
    for key, value in changes.items():
        if value is None:
            raw["network"].pop(key, None)
        else:
            raw["network"][key] = value
    return raw


def byo_subnet(index: int, **changes: object) -> list[dict[str, Any]]:
    subnets = copy.deepcopy(BYO_VPC["public_subnets"])
    subnets[index].update(changes)
    return subnets


def test_the_config_is_frozen() -> None:
    # Built once in app.py; nothing below may change it.
    config = parse(DEFAULT_RAW)
    with pytest.raises(AttributeError):
        config.network.cidr = "10.1.0.0/16"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("instance_type", "arm64"),
    [
        ("t4g.nano", True),
        ("c7gn.large", True),
        ("m6gd.xlarge", True),
        ("t3.micro", False),
        ("m7i-flex.large", False),
    ],
)
def test_the_image_architecture_follows_the_instance_type(instance_type: str, arm64: bool) -> None:
    # A Graviton type with an x86 image (or the reverse) would never boot.
    assert is_graviton(instance_type) is arm64


def test_a_json_string_from_the_command_line_is_accepted() -> None:
    # `cdk synth -c eip-reclaim='{...}'` passes the value as a string.
    assert from_context(json.dumps(MULTI_RAW)) == parse(MULTI_RAW)


# Each bad configuration and the key its one-line error must name.
BAD_CONFIGS = {
    "malformed CIDR": (
        with_change("network.cidr", "10.0.0.0/33"),
        "network.cidr: '10.0.0.0/33' is not an IPv4 CIDR",
    ),
    "host bits in CIDR": (
        with_change("network.cidr", "10.0.0.1/16"),
        "network.cidr: '10.0.0.1/16' is not an IPv4",
    ),
    "one AZ": (with_change("network.az_count", 1), "network.az_count: 1: needs 2 to 6 availability zones"),
    "duplicate service names": (
        with_change("services", [{"name": "web"}, {"name": "api"}, {"name": "web"}]),
        "services[2].name: 'web' appears more than once",
    ),
    "bad allocation id": (
        with_change("services[0].allocation_id", "eipalloc-xyz"),
        "services[0].allocation_id: 'eipalloc-xyz' is not an allocation id",
    ),
    "unknown top-level key": (with_change("regoin", "x"), "eip-reclaim.regoin: unknown key"),
    "unknown service key": (with_change("services[0].port", 443), "services[0].port: unknown key"),
    "port out of range": (
        with_change("services[0].ingress_ports", [443, 70000]),
        "services[0].ingress_ports[1]: 70000",
    ),
    "subnets do not fit": (
        with_change("network.cidr", "10.0.0.0/24"),
        "network.subnet_prefix_length: /24 must lie between /25 and /28",
    ),
    "retention CloudWatch lacks": (
        with_change("network.flow_log_retention_days", 31),
        "network.flow_log_retention_days: 31",
    ),
    "string for a number": (
        with_change("network.az_count", "2"),
        "network.az_count: expected an integer, got a string",
    ),
    "same address twice": (
        with_change(
            "services",
            [
                {"name": "a", "allocation_id": "eipalloc-0123abcd"},
                {"name": "b", "allocation_id": "eipalloc-0123abcd"},
            ],
        ),
        "services[1].allocation_id: 'eipalloc-0123abcd' appears more than once",
    ),
    "bad instance type": (
        with_change("services[0].instance_type", "t4g"),
        "services[0].instance_type: 't4g' is not",
    ),
    "payload Python older than the payload's floor": (
        with_change("payload_python_version", "3.8"),
        "payload_python_version: '3.8' must be the instance's python3 as major.minor, 3.9 or later",
    ),
    "payload Python with a patch level": (
        with_change("payload_python_version", "3.9.16"),
        "payload_python_version: '3.9.16' must be",
    ),
    "payload Python as a number": (
        with_change("payload_python_version", 3.9),
        "payload_python_version: expected a string, got float",
    ),
    "alarm topic that is not an SNS ARN": (
        with_change("alarm_topic_arn", "arn:aws:sqs:us-east-1:123456789012:queue"),
        "alarm_topic_arn: 'arn:aws:sqs:us-east-1:123456789012:queue' is not an SNS topic ARN",
    ),
    "unknown network egress": (
        with_change("network.egress", "nat-gateway"),
        "network.egress: 'nat-gateway' is not one of 'nat-instances', 'ipv6', 'interface-endpoints'",
    ),
    "unknown NAT strategy": (
        with_change("network.nat_egress", "detour"),
        "network.nat_egress: 'detour' is not one of 'policy-route', 'main-table'",
    ),
    "NAT strategy without NATs": (
        {"network": {"egress": "ipv6", "nat_egress": "main-table"}},
        "network.nat_egress: applies only to network.egress 'nat-instances', not 'ipv6'",
    ),
    "NAT instance type without NATs": (
        {"network": {"egress": "interface-endpoints", "nat_instance_type": "t4g.nano"}},
        "network.nat_instance_type: applies only to network.egress 'nat-instances'",
    ),
    "malformed VPC id": (byo_with(vpc_id="vpc-123"), "network.vpc_id: 'vpc-123' is not a VPC id"),
    "own VPC without its CIDR": (byo_with(vpc_cidr=None), "network.vpc_cidr: required with network.vpc_id"),
    "own VPC without subnets": (
        byo_with(public_subnets=None),
        "network.public_subnets: required with network.vpc_id",
    ),
    "own VPC with one subnet": (
        byo_with(public_subnets=BYO_VPC["public_subnets"][:1]),
        "network.public_subnets: 1 subnets: needs 2 to 6, one per availability zone",
    ),
    "own VPC with a new VPC's key": (
        byo_with(cidr="10.0.0.0/16"),
        "network.cidr: describes a VPC the app creates: with network.vpc_id give network.vpc_cidr",
    ),
    "subnet outside the VPC": (
        byo_with(public_subnets=byo_subnet(1, cidr="10.9.0.0/24")),
        "network.public_subnets[1].cidr: 10.9.0.0/24 does not lie in network.vpc_cidr 172.31.0.0/16",
    ),
    "two subnets in one AZ": (
        byo_with(public_subnets=byo_subnet(1, availability_zone="eu-west-1a")),
        "network.public_subnets[1].availability_zone: 'eu-west-1a' appears more than once",
    ),
    "subnet without its route table": (
        byo_with(
            public_subnets=[
                {k: v for k, v in s.items() if k != "route_table_id"} for s in BYO_VPC["public_subnets"]
            ]
        ),
        "network.public_subnets[0].route_table_id: required key is missing",
    ),
    "malformed subnet id": (
        byo_with(public_subnets=byo_subnet(0, subnet_id="subnet-xyz")),
        "network.public_subnets[0].subnet_id: 'subnet-xyz' is not a subnet id",
    ),
    "unknown existing endpoint": (
        byo_with(existing_endpoints=["ec2", "sts"]),
        "network.existing_endpoints[1]: 'sts' is not one of 's3', 'ec2'",
    ),
    "existing endpoints of a new VPC": (
        with_change("network.existing_endpoints", ["ec2"]),
        "network.existing_endpoints: describes a team's own VPC: it applies only with network.vpc_id",
    ),
    "alarm topic as a list": (
        with_change("alarm_topic_arn", ["arn:aws:sns:us-east-1:123456789012:t"]),
        "alarm_topic_arn: expected a string, got a list",
    ),
    "an HTTP path on 443 without tls": (
        with_change("services[0].health_check", {"port": 443, "path": "/health"}),
        'services[0].health_check.tls: a path on port 443 is probed in plain HTTP unless "tls": true',
    ),
    "tls that is not a boolean": (
        with_change("services[0].health_check", {"port": 443, "path": "/health", "tls": "yes"}),
        "services[0].health_check.tls: expected true or false, got a string",
    ),
    "tls without a path": (
        with_change("services[0].health_check", {"port": 443, "tls": True}),
        "services[0].health_check.tls: applies to the HTTP probe: give a path as well",
    ),
}


def test_alarms_go_to_the_apps_own_topic_unless_one_is_given() -> None:
    # None: the network stack creates an encrypted topic; a given ARN is used as it is.
    assert parse({}).alarm_topic_arn is None
    arn = "arn:aws-us-gov:sns:us-gov-west-1:123456789012:on-call.fifo"
    assert parse({"alarm_topic_arn": arn}).alarm_topic_arn == arn


def test_a_health_check_probes_plain_http_unless_tls_is_asked() -> None:
    # tls defaults to false; a TCP connect on 443 (no path) needs no TLS, an HTTP path on 443 does.
    def health(**check: object) -> Any:
        (service,) = parse(with_change("services[0].health_check", dict(check))).services
        return service.health_check

    assert health(port=8080, path="/health").tls is False
    assert health(port=443).tls is False
    assert health(port=443, path="/health", tls=True).tls is True
    assert health(port=8443, path="/health", tls=True).tls is True


def _probe(check: HealthCheckConfig) -> Any:
    config = payload_config(
        allocation_id="eipalloc-0123456789abcdef0",
        egress=DIRECT,
        dualstack=False,
        nat_by_subnet=(),
        auto_scaling_group="g",
        lifecycle_hook="h",
        hook_timeout_seconds=300,
        stack_name="s",
        group_logical_id="G",
        service="web",
        health_check=check,
    )
    return config["health_check"]


def test_the_payload_config_carries_tls_only_when_true() -> None:
    # A payload that knows no "tls" key still accepts every probe that does not ask for TLS.
    assert _probe(HealthCheckConfig(port=443, path="/health", tls=True))["tls"] is True
    assert "tls" not in _probe(HealthCheckConfig(port=8080, path="/health"))


def test_the_library_refuses_an_http_path_on_443_naming_the_prop() -> None:
    # HealingService takes a HealthCheckConfig as it is: the same rule must hold there.
    app = cdk.App(context=FEATURE_FLAGS)
    stack = cdk.Stack(app, "Team")
    nat = StableNatProvider()
    vpc = ec2.Vpc(stack, "Vpc", max_azs=2, nat_gateway_provider=nat)
    refused = r'^HealingService\(Web\)\.health_check\.tls: a path on port 443 .* "tls": true'
    with pytest.raises(ConfigError, match=refused):
        HealingService(
            stack,
            "Web",
            vpc=vpc,
            egress=Egress.stable_nat(nat),
            health_check=HealthCheckConfig(port=443, path="/health"),
        )


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_value_is_one_line_naming_the_key(case: str) -> None:
    # The user must see which key is wrong and why, on one line.
    raw, expected = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_context_that_is_not_json_names_the_context_key() -> None:
    # A typo in `-c eip-reclaim=...` must not surface as a Python traceback.
    with pytest.raises(ConfigError, match=r"^eip-reclaim: not valid JSON"):
        from_context("{network: }")


def _run_app(raw: object) -> subprocess.CompletedProcess[str]:
    """Run app.py as the CDK CLI does: context in CDK_CONTEXT_JSON, output to a scratch directory."""
    env = {
        **os.environ,
        "CDK_CONTEXT_JSON": json.dumps({"eip-reclaim": raw}),
        "CDK_OUTDIR": "/tmp/eipr-bad-synth",
    }
    return subprocess.run(
        [sys.executable, "app.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "case",
    [
        "malformed CIDR",
        "one AZ",
        "duplicate service names",
        "bad allocation id",
        "unknown service key",
        "NAT strategy without NATs",
        "own VPC without subnets",
    ],
)
def test_the_app_fails_synth_with_that_line_and_no_stack_trace(case: str) -> None:
    # What a user of `cdk synth` sees: exit non-zero, our one line on stderr, no Python or JavaScript trace.
    raw, expected = BAD_CONFIGS[case]
    done = _run_app(raw)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"eip-reclaim: bad configuration: {expected}"), lines[0]


def test_the_cdk_cli_shows_the_line_without_a_javascript_stack_trace(tmp_path: Path) -> None:
    # The real CLI: it adds only that the app exited non-zero.
    cdk = shutil.which("cdk")
    assert cdk, "the CDK CLI is installed by `make setup`"
    bad = json.dumps(BAD_CONFIGS["one AZ"][0])
    done = subprocess.run(
        [cdk, "synth", "--no-notices", "--output", str(tmp_path / "out"), "-c", f"eip-reclaim={bad}"],
        cwd=REPO,
        env={**os.environ, "CDK_DISABLE_CLI_TELEMETRY": "true"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode != 0
    assert "eip-reclaim: bad configuration: network.az_count: 1: needs 2 to 6" in done.stderr
    assert "Traceback" not in done.stderr
    assert "    at " not in done.stderr
