"""The construct library: its public face, HealingService in a team's own VPC, StableNatProvider defaults."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aws_cdk as cdk
import pytest
import tomllib
from aws_cdk import assertions
from aws_cdk import aws_ec2 as ec2
from cdk_nag import AwsSolutionsChecks

import eip_reclaim
import stacks
from tests.unit.cdk_app import DEFAULT_RAW, FEATURE_FLAGS, REPO

OWN_APP = REPO / "examples" / "own-app" / "own_app.py"
# The logical ID of the VPC that _stack_with_vpc makes.
VPC_ID = "Vpc8378EB38"


def load_example(path: Path) -> ModuleType:
    """An example app's module, imported by its path (the examples are not packages)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def own_app() -> tuple[Path, cdk.Stack]:
    """examples/own-app's stack, synthesized once with cdk-nag, as its cdk.json's flags set it up."""
    module = load_example(OWN_APP)
    outdir = Path(tempfile.mkdtemp(prefix="eipr-own-app-"))
    app = cdk.App(context=FEATURE_FLAGS, outdir=str(outdir))
    stack = module.PublicServicesStack(app, "TeamPublicServices")
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app, verbose=True))
    app.synth()
    return outdir, stack


@pytest.fixture(scope="module")
def own_template() -> assertions.Template:
    outdir, _ = own_app()
    return assertions.Template.from_json(
        json.loads((outdir / "TeamPublicServices.template.json").read_text())
    )


def _stack_with_vpc(**vpc: Any) -> tuple[cdk.App, cdk.Stack, ec2.Vpc, eip_reclaim.StableNatProvider]:
    app = cdk.App(context=FEATURE_FLAGS)
    stack = cdk.Stack(app, "Team")
    nat = eip_reclaim.StableNatProvider()
    network = ec2.Vpc(stack, "Vpc", max_azs=2, nat_gateway_provider=nat, **vpc)
    return app, stack, network, nat


# --- the public face -------------------------------------------------------------------------------


def test_in_a_checkout_eip_reclaim_is_the_stacks_package() -> None:
    # One package under two names, not two copies: a class from one is the class from the other.
    assert eip_reclaim is stacks
    assert eip_reclaim.HealingService is stacks.service.HealingService


def test_every_public_name_resolves_and_nothing_else_is_offered() -> None:
    listed = set(eip_reclaim.__all__) - {"__version__"}
    assert listed == set(stacks._PUBLIC), "__all__ and the lazy map name the same things"
    for name in listed:
        assert getattr(eip_reclaim, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'NatInstance'"):
        _ = eip_reclaim.NatInstance  # type: ignore[attr-defined]


def test_version_is_the_packages_and_the_changelogs() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "eip_reclaim.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", eip_reclaim.__version__)
    changelog = (REPO / "CHANGELOG.md").read_text()
    first = re.search(r"^## (\S+)", changelog, re.M)
    assert first is not None and first.group(1) == eip_reclaim.__version__


def test_the_configuration_loads_without_aws_cdk_lib() -> None:
    # The payload bundle and the configuration are imported by tests and tools that need no CDK (and its
    # Node.js start, seconds): the package's face must not pull it in.
    import subprocess

    code = "import stacks.config, stacks.bundle, sys; print('aws_cdk' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- HealingService in a team's own VPC (examples/own-app) ---------------------------------------------


def test_own_app_is_cdk_nag_clean() -> None:
    outdir, _ = own_app()
    report = json.loads((outdir / "validation-report.json").read_text())
    assert [(p["pluginName"], p["conclusion"], p["violations"]) for p in report["pluginReports"]] == [
        ("AwsSolutions", "success", [])
    ]


def test_two_services_two_groups_of_one(own_template: assertions.Template) -> None:
    # Each service: its own group over the public subnets, one instance, named after the stack and service.
    for name in ("web", "mail"):
        own_template.has_resource_properties(
            "AWS::AutoScaling::AutoScalingGroup",
            {"AutoScalingGroupName": f"TeamPublicServices-{name}", "MinSize": "1", "DesiredCapacity": "1"},
        )


def test_each_address_has_its_own_pinned_logical_id(own_template: assertions.Template) -> None:
    # Two services in one stack cannot share the app's one pinned id; each is pinned by its construct id.
    eips = own_template.find_resources("AWS::EC2::EIP")
    assert set(eips) == {"WebElasticIp", "MailElasticIp"}
    assert all(r["DeletionPolicy"] == "Retain" for r in eips.values())


def test_each_public_subnet_detours_through_its_azs_nat(own_template: assertions.Template) -> None:
    # 10.40.0.0/16 in two AZs, two subnet groups: /18s; each public subnet's NAT sits at its .4, and each
    # service's configuration pairs the subnet with the NAT of its own AZ.
    _, stack = own_app()
    interfaces = own_template.find_resources("AWS::EC2::NetworkInterface")
    assert sorted(r["Properties"]["PrivateIpAddress"] for r in interfaces.values()) == [
        "10.40.0.4",
        "10.40.64.4",
    ]
    for name in ("Web", "Mail"):
        config = _payload_config(stack, name)
        assert config["egress"] == "policy-route"
        assert sorted(config["nat_by_subnet"].values()) == ["10.40.0.4", "10.40.64.4"]


def test_one_topic_for_nats_and_services(own_template: assertions.Template) -> None:
    # The example shares its Alerts: one topic, and no service made one of its own.
    assert len(own_template.find_resources("AWS::SNS::Topic")) == 1


def _payload_config(stack: cdk.Stack, construct_id: str) -> dict[str, Any]:
    """The payload configuration a service's user data writes (tokens still unresolved)."""
    service = stack.node.find_child(construct_id)
    assert isinstance(service, eip_reclaim.HealingService)
    return service.healing_group.payload_config


def test_ipv6_egress_writes_direct_and_dualstack() -> None:
    _, stack, network, _ = _stack_with_vpc(
        ip_protocol=ec2.IpProtocol.DUAL_STACK, nat_gateways=0, subnet_configuration=_public_only()
    )
    eip_reclaim.HealingService(stack, "Web", vpc=network, egress=eip_reclaim.Egress.ipv6())
    config = _payload_config(stack, "Web")
    assert (config["egress"], config["dualstack"], "nat_by_subnet" in config) == ("direct", True, False)
    # The API is reached over IPv6 before the address is claimed: the instance gets an IPv6 address.
    assertions.Template.from_stack(stack).has_resource_properties(
        "AWS::EC2::LaunchTemplate",
        {
            "LaunchTemplateData": assertions.Match.object_like(
                {"NetworkInterfaces": [assertions.Match.object_like({"Ipv6AddressCount": 1})]}
            )
        },
    )


def test_interface_endpoint_egress_has_no_nat_map() -> None:
    _, stack, network, _ = _stack_with_vpc(nat_gateways=0, subnet_configuration=_public_only())
    eip_reclaim.HealingService(stack, "Web", vpc=network, egress=eip_reclaim.Egress.interface_endpoints())
    config = _payload_config(stack, "Web")
    assert (config["egress"], "dualstack" in config, "nat_by_subnet" in config) == ("direct", False, False)


def test_nat_addresses_are_written_as_given() -> None:
    app = cdk.App(context=FEATURE_FLAGS)
    stack = cdk.Stack(app, "Team")
    network = ec2.Vpc.from_vpc_attributes(
        stack,
        "Vpc",
        vpc_id="vpc-0a1b2c3d4e5f60718",
        availability_zones=["eu-west-1a", "eu-west-1b"],
        public_subnet_ids=["subnet-0aaaaaaaaaaaaaaa1", "subnet-0bbbbbbbbbbbbbbb2"],
    )
    egress = eip_reclaim.Egress.nat_addresses(
        {"subnet-0aaaaaaaaaaaaaaa1": "172.31.0.10", "subnet-0bbbbbbbbbbbbbbb2": "172.31.16.10"},
        strategy="main-table",
    )
    eip_reclaim.HealingService(stack, "Web", vpc=network, egress=egress)
    config = _payload_config(stack, "Web")
    assert config["egress"] == "main-table"
    assert config["nat_by_subnet"] == {
        "subnet-0aaaaaaaaaaaaaaa1": "172.31.0.10",
        "subnet-0bbbbbbbbbbbbbbb2": "172.31.16.10",
    }


def _public_only() -> list[ec2.SubnetConfiguration]:
    return [ec2.SubnetConfiguration(name="Public", subnet_type=ec2.SubnetType.PUBLIC)]


# --- what it refuses, in one line naming the prop ------------------------------------------------------


def _refused(
    build: Callable[[cdk.Stack, ec2.IVpc, eip_reclaim.StableNatProvider], object], match: str
) -> None:
    _, stack, network, nat = _stack_with_vpc()
    with pytest.raises(eip_reclaim.ConfigError, match=match):
        build(stack, network, nat)


def test_a_name_that_cannot_name_a_group_is_refused() -> None:
    _refused(
        lambda s, v, n: eip_reclaim.HealingService(
            s, "Web_1", vpc=v, egress=eip_reclaim.Egress.stable_nat(n)
        ),
        r"^HealingService\(Web_1\)\.name: 'web_1' must be",
    )


def test_a_bad_port_is_refused_naming_it() -> None:
    _refused(
        lambda s, v, n: eip_reclaim.HealingService(
            s, "Web", vpc=v, egress=eip_reclaim.Egress.stable_nat(n), ingress_ports=[0]
        ),
        r"^HealingService\(Web\)\.ingress_ports\[0\]: 0 is not a TCP port",
    )


def test_a_provider_that_made_no_nats_is_refused() -> None:
    # A provider that no VPC used (another VPC's, or none) has no NAT for this service to detour through.
    _, stack, network, _ = _stack_with_vpc()
    other = eip_reclaim.StableNatProvider()
    with pytest.raises(eip_reclaim.ConfigError, match=r"^egress\.stable_nat: the provider has no NAT"):
        eip_reclaim.HealingService(stack, "Web", vpc=network, egress=eip_reclaim.Egress.stable_nat(other))


def test_a_subnet_in_an_az_without_a_nat_is_refused() -> None:
    # A subnet of the caller's choosing in an AZ where the provider put no NAT: no way to the API there.
    _, stack, network, nat = _stack_with_vpc()
    elsewhere = ec2.Subnet.from_subnet_attributes(
        stack, "Elsewhere", subnet_id="subnet-0ccccccccccccccc3", availability_zone="eu-west-1c"
    )
    with pytest.raises(
        eip_reclaim.ConfigError,
        match=r"^egress\.stable_nat: no NAT instance in the availability zone of subnet Team/Elsewhere$",
    ):
        eip_reclaim.HealingService(
            stack,
            "Web",
            vpc=network,
            egress=eip_reclaim.Egress.stable_nat(nat),
            vpc_subnets=ec2.SubnetSelection(subnets=[elsewhere]),
        )


def test_a_subnet_missing_from_the_nat_addresses_is_refused() -> None:
    _refused(
        lambda s, v, n: eip_reclaim.HealingService(
            s, "Web", vpc=v, egress=eip_reclaim.Egress.nat_addresses({"subnet-0aaaaaaaaaaaaaaa1": "10.0.0.9"})
        ),
        r"^egress\.nat_addresses: no NAT address for subnet Team/Vpc/PublicSubnet1",
    )


def test_a_warm_pool_with_ipv6_egress_is_refused() -> None:
    _refused(
        lambda s, v, n: eip_reclaim.HealingService(
            s, "Web", vpc=v, egress=eip_reclaim.Egress.ipv6(), warm_pool=True
        ),
        r"^HealingService\(Web\)\.warm_pool: not with Egress\.ipv6\(\)",
    )


def test_an_unknown_strategy_is_refused() -> None:
    with pytest.raises(eip_reclaim.ConfigError, match=r"^egress\.strategy: 'iptables' is not one of"):
        eip_reclaim.Egress.stable_nat(eip_reclaim.StableNatProvider(), strategy="iptables")


# --- StableNatProvider with no arguments ---------------------------------------------------------------


def test_stable_nat_provider_defaults() -> None:
    _, stack, _, nat = _stack_with_vpc()
    template = assertions.Template.from_stack(stack)
    # The VPC's own block by reference, names from the stack, the smallest Graviton type and its image.
    template.has_resource_properties(
        "AWS::EC2::SecurityGroup",
        {
            "GroupDescription": "NAT instances: admit only the VPC own addresses",
            "SecurityGroupIngress": [
                assertions.Match.object_like({"CidrIp": {"Fn::GetAtt": [VPC_ID, "CidrBlock"]}})
            ],
        },
    )
    assert [n.group_name for n in nat.instances] == ["Team-nat1", "Team-nat2"]
    template.has_resource_properties(
        "AWS::EC2::LaunchTemplate",
        {
            "LaunchTemplateData": assertions.Match.object_like(
                {
                    "InstanceType": "t4g.nano",
                    "ImageId": assertions.Match.string_like_regexp("al2023-ami-kernel-default-arm64"),
                }
            )
        },
    )


# --- cdk-nag in stacks bound to an account and region (a pipeline's stages) ---------------------------


def test_acknowledgements_match_in_stacks_bound_to_an_account_and_region(tmp_path: Path) -> None:
    # cdk-nag prints a concrete region and account in an ARN where the stack has them; acknowledgements
    # written for <AWS::Region>/<AWS::AccountId> alone would leave every IAM5 finding open there.
    app = cdk.App(context=FEATURE_FLAGS, outdir=str(tmp_path))
    stage = cdk.Stage(app, "Prod", env=cdk.Environment(account="333333333333", region="us-east-1"))
    eip_reclaim.build(stage, eip_reclaim.parse(DEFAULT_RAW), checks=False)
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app, verbose=True))
    app.synth()
    report = json.loads((tmp_path / "validation-report.json").read_text())
    open_findings = [v["ruleName"] for p in report["pluginReports"] for v in p["violations"]]
    assert open_findings == []
