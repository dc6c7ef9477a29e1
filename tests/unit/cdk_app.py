"""Synthesize the CDK app for tests exactly as `cdk synth` does: cdk.json's flags, the same `build`."""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aws_cdk as cdk
from aws_cdk import assertions

from stacks.assembly import Stacks, build
from stacks.config import CONTEXT_KEY, AppConfig, parse

REPO = Path(__file__).resolve().parents[2]
CDK_JSON = json.loads((REPO / "cdk.json").read_text())
DEFAULT_RAW: dict[str, Any] = CDK_JSON["context"][CONTEXT_KEY]
FEATURE_FLAGS = {k: v for k, v in CDK_JSON["context"].items() if k != CONTEXT_KEY}

# jsii runs Node from PATH: the venv's Node 24, as the Makefile sets it, not an older system one.
_VENV_BIN = str(Path(sys.executable).parent)
if not os.environ.get("PATH", "").startswith(_VENV_BIN):
    os.environ["PATH"] = f"{_VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


@dataclass(frozen=True)
class Synthesized:
    """An app as `cdk synth` writes it: the stacks, their templates and the validation report."""

    config: AppConfig
    stacks: Stacks
    outdir: Path

    def template(self, stack: cdk.Stack) -> assertions.Template:
        return assertions.Template.from_json(self.template_json(stack))

    def template_json(self, stack: cdk.Stack) -> dict[str, Any]:
        body: dict[str, Any] = json.loads((self.outdir / f"{stack.artifact_id}.template.json").read_text())
        return body

    def templates(self) -> dict[str, dict[str, Any]]:
        return {p.name: json.loads(p.read_text()) for p in sorted(self.outdir.glob("*.template.json"))}

    def validation_report(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads((self.outdir / "validation-report.json").read_text())
        return report

    @property
    def network(self) -> cdk.Stack:
        return self.stacks.network

    @property
    def service(self) -> cdk.Stack:
        return self.stacks.services[0]


def synthesize(raw: dict[str, Any], outdir: Path) -> Synthesized:
    """Build and synthesize the app for a raw configuration, with cdk-nag and CDK's validations."""
    config = parse(raw)
    app = cdk.App(context=FEATURE_FLAGS, outdir=str(outdir))
    stacks = build(app, config)
    app.synth()
    return Synthesized(config=config, stacks=stacks, outdir=outdir)


# A configuration that exercises what the default does not: three AZs, two services sharing the
# network, an adopted address, an x86 instance type, a restricted ingress range, a warm pool and a watchdog.
MULTI_RAW: dict[str, Any] = {
    "stack_prefix": "Multi",
    "network": {
        "cidr": "10.20.0.0/20",
        "az_count": 3,
        "subnet_prefix_length": 26,
        "nat_instance_type": "t3.nano",
    },
    "services": [
        # The warm pool and the watchdog on, so the whole-app checks (cdk-nag, cfn-lint, checkov) see them.
        {
            "name": "web",
            "ingress_ports": [80, 443],
            "warm_pool": True,
            "health_check": {"port": 80, "path": "/"},
        },
        {
            "name": "smtp",
            "instance_type": "t3.small",
            "ingress_ports": [25],
            "ingress_cidr": "192.0.2.0/24",
            "allocation_id": "eipalloc-0123456789abcdef0",
        },
    ],
}


# The handover a team chooses: launch-first for deploys and health replacements, with and without a
# warm pool (an instance refresh then), and with the watchdog.
LAUNCH_FIRST_RAW: dict[str, Any] = {
    "stack_prefix": "First",
    "services": [
        {"name": "web", "handover": "launch-first", "health_check": {"port": 443}},
        {"name": "pooled", "handover": "launch-first", "warm_pool": True},
    ],
}

# Spot with Capacity Rebalancing (launch-first by requirement), on x86 types.
SPOT_RAW: dict[str, Any] = {
    "stack_prefix": "Spot",
    "services": [
        {
            "name": "web",
            "handover": "launch-first",
            "spot": {"instance_types": ["t3.micro", "t3a.micro", "m5.large"]},
        }
    ],
}


# The two NAT-free networks, as a team would switch to them: egress, and nothing NAT-specific.
IPV6_RAW: dict[str, Any] = {
    "stack_prefix": "Six",
    "network": {"egress": "ipv6"},
    "services": [{"name": "web"}],
}
ENDPOINTS_RAW: dict[str, Any] = {
    "stack_prefix": "Private",
    "network": {"egress": "interface-endpoints", "az_count": 3},
    "services": [{"name": "web"}],
}

# A team's own VPC, stated in the configuration (ids from the documentation's style, not a real account).
BYO_VPC: dict[str, Any] = {
    "vpc_id": "vpc-0a1b2c3d4e5f60718",
    "vpc_cidr": "172.31.0.0/16",
    "public_subnets": [
        {
            "subnet_id": "subnet-0aaaaaaaaaaaaaaa1",
            "availability_zone": "eu-west-1a",
            "cidr": "172.31.0.0/20",
            "route_table_id": "rtb-0ccccccccccccccc1",
        },
        {
            "subnet_id": "subnet-0bbbbbbbbbbbbbbb2",
            "availability_zone": "eu-west-1b",
            "cidr": "172.31.16.0/20",
            "route_table_id": "rtb-0ccccccccccccccc1",
        },
    ],
}


def byo_raw(egress: str, **network: Any) -> dict[str, Any]:
    """The team's VPC above in one network mode; `network` adds or overrides keys."""
    return {
        "stack_prefix": f"Own{egress.title().replace('-', '')}",
        "network": {**BYO_VPC, "egress": egress, **network},
        "services": [{"name": "web"}],
    }


# The VPC already has the S3 gateway endpoint and the EC2 and Auto Scaling interface endpoints.
BYO_RAWS: dict[str, dict[str, Any]] = {
    "nat-instances": byo_raw("nat-instances"),
    "ipv6": byo_raw("ipv6"),
    "interface-endpoints": byo_raw("interface-endpoints", existing_endpoints=["s3", "ec2", "autoscaling"]),
}


@functools.cache
def default_app() -> Synthesized:
    """The default app from cdk.json, synthesized once per test session."""
    return synthesize(DEFAULT_RAW, Path(tempfile.mkdtemp(prefix="eipr-cdk-default-")))


@functools.cache
def multi_app() -> Synthesized:
    """`MULTI_RAW`, synthesized once per test session."""
    return synthesize(MULTI_RAW, Path(tempfile.mkdtemp(prefix="eipr-cdk-multi-")))


@functools.cache
def ipv6_app() -> Synthesized:
    """`IPV6_RAW`, synthesized once per test session."""
    return synthesize(IPV6_RAW, Path(tempfile.mkdtemp(prefix="eipr-cdk-ipv6-")))


@functools.cache
def endpoints_app() -> Synthesized:
    """`ENDPOINTS_RAW`, synthesized once per test session."""
    return synthesize(ENDPOINTS_RAW, Path(tempfile.mkdtemp(prefix="eipr-cdk-endpoints-")))


@functools.cache
def byo_app(egress: str) -> Synthesized:
    """`BYO_RAWS[egress]`, synthesized once per test session."""
    return synthesize(BYO_RAWS[egress], Path(tempfile.mkdtemp(prefix=f"eipr-cdk-byo-{egress}-")))


@functools.cache
def launch_first_app() -> Synthesized:
    """`LAUNCH_FIRST_RAW`, synthesized once per test session."""
    return synthesize(LAUNCH_FIRST_RAW, Path(tempfile.mkdtemp(prefix="eipr-cdk-launch-first-")))


@functools.cache
def spot_app() -> Synthesized:
    """`SPOT_RAW`, synthesized once per test session."""
    return synthesize(SPOT_RAW, Path(tempfile.mkdtemp(prefix="eipr-cdk-spot-")))
