"""What the lab builds, taken from the synthesized app: subnets, NAT addresses, the payload's config.

`load()` synthesizes the default app once and reads the templates; `render_config` turns the
configuration that the instance's user data carries into the lab's, replacing only what the cloud
would fill in at deploy (subnet ids, the allocation id, the region) and adding the lab's endpoints.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Subnet:
    """A public subnet: where instances boot and where its AZ's NAT instance sits."""

    key: str  # the subnet's key in the synthesized `nat_by_subnet` (a deploy-time token there)
    az_index: int
    cidr: ipaddress.IPv4Network
    nat_ip: ipaddress.IPv4Address

    @property
    def router_ip(self) -> ipaddress.IPv4Address:
        """The VPC router: the subnet's base address + 1, as in every VPC subnet."""
        return self.cidr.network_address + 1

    @property
    def resolver_ip(self) -> ipaddress.IPv4Address:
        """The VPC resolver's subnet address (base + 2), which AL2023's DHCP routes point at."""
        return self.cidr.network_address + 2


@dataclass(frozen=True)
class Spec:
    source: str  # where this spec came from, for the timeline and the docs
    vpc_cidr: ipaddress.IPv4Network
    subnets: tuple[Subnet, ...]
    # The payload's configuration as synthesized; values that are deploy-time tokens are named by
    # the placeholders below.
    config: dict[str, Any]


REGION = "{region}"
ALLOCATION_ID = "{allocation_id}"
AUTO_SCALING_GROUP = "{auto_scaling_group}"
# The stack a signal names (AWS::StackName at deploy): the lab's CloudFormation stand-in takes any name.
STACK_NAME = "lab-service-stack"


def hand_written() -> Spec:
    """The default app's shape (10.0.0.0/16, /24 public subnets first, NAT at base + 4)."""
    vpc = ipaddress.IPv4Network("10.0.0.0/16")
    subnets = tuple(
        Subnet(
            key=f"{{subnet{i}}}",
            az_index=i,
            cidr=ipaddress.IPv4Network(f"10.0.{i}.0/24"),
            nat_ip=ipaddress.IPv4Address(f"10.0.{i}.4"),
        )
        for i in range(2)
    )
    config = {
        "version": 1,
        "region": REGION,
        "allocation_id": ALLOCATION_ID,
        "nat_by_subnet": {s.key: str(s.nat_ip) for s in subnets},
        "lifecycle_hook": {"auto_scaling_group": AUTO_SCALING_GROUP, "hook": "launch"},
        "deadline_seconds": 240,
    }
    return Spec(source="hand-written", vpc_cidr=vpc, subnets=subnets, config=config)


def load() -> Spec:
    """The lab's spec: the only place that decides where it comes from."""
    return synthesized()


def synthesize(outdir: Path) -> str:
    """Synthesize the default app (cdk.json's configuration and flags) as `cdk synth` would; a note.

    The templates are written before CDK's validations run, so a validation finding (which the
    stack's own tests report) does not keep the lab from the configuration the user data carries.
    """
    # jsii starts Node from PATH: the venv's, as the Makefile arranges.
    venv_bin = str(Path(sys.executable).parent)
    os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    import aws_cdk as cdk

    from stacks.assembly import build
    from stacks.config import CONTEXT_KEY, parse

    context = json.loads((REPO / "cdk.json").read_text())["context"]
    flags = {k: v for k, v in context.items() if k != CONTEXT_KEY}
    app = cdk.App(context=flags, outdir=str(outdir))
    build(app, parse(context[CONTEXT_KEY]))
    try:
        app.synth()
    except RuntimeError as error:  # jsii reports CDK's ValidationFailed this way
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"synthesized (CDK validation reported: {first_line.split('. A copy')[0]})"
    return "synthesized"


def synthesized() -> Spec:
    """Read the lab's spec from the templates of a real synth of the default app."""
    with tempfile.TemporaryDirectory(prefix="eip-reclaim-lab-synth-") as outdir:
        note = synthesize(Path(outdir))
        templates = [json.loads(p.read_text()) for p in sorted(Path(outdir).glob("*.template.json"))]
    if not templates:
        raise RuntimeError(f"the app synthesized no template ({note})")
    return from_templates(templates, note)


def from_templates(templates: list[dict[str, Any]], note: str) -> Spec:
    resources = {k: v for t in templates for k, v in t.get("Resources", {}).items()}
    outputs = {k: v for t in templates for k, v in t.get("Outputs", {}).items()}
    vpcs = [r for r in resources.values() if r["Type"] == "AWS::EC2::VPC"]
    user_data = [
        r["Properties"]["LaunchTemplateData"]["UserData"]
        for r in resources.values()
        if r["Type"] == "AWS::EC2::LaunchTemplate" and "nat_by_subnet" in json.dumps(r["Properties"])
    ]
    if len(vpcs) != 1 or not user_data:
        raise RuntimeError("synth: expected one VPC and a launch template whose user data carries the config")
    text, intrinsics = _flatten(user_data[0])
    raw = _config_in(text)

    def intrinsic(value: str) -> dict[str, Any] | None:
        return intrinsics.get(value)

    def subnet_resource(token: dict[str, Any]) -> str:
        """The logical ID of the subnet a (cross-stack) reference names."""
        if "Ref" in token:
            return str(token["Ref"])
        if "Fn::GetStackOutput" in token:
            return str(outputs[token["Fn::GetStackOutput"]["OutputName"]]["Value"]["Ref"])
        if "Fn::ImportValue" in token:
            name = token["Fn::ImportValue"]
            return next(
                str(o["Value"]["Ref"]) for o in outputs.values() if o.get("Export", {}).get("Name") == name
            )
        raise RuntimeError(f"synth: cannot follow the subnet reference {token}")

    subnets: list[Subnet] = []
    nat_by_subnet = {}
    for key, nat_ip in raw["nat_by_subnet"].items():
        token = intrinsic(key)
        logical_id = subnet_resource(token) if token else key
        properties = resources[logical_id]["Properties"]
        az = properties["AvailabilityZone"]
        az_index = az["Fn::Select"][0] if isinstance(az, dict) else len(subnets)
        subnets.append(
            Subnet(
                key=logical_id,
                az_index=int(az_index),
                cidr=ipaddress.IPv4Network(properties["CidrBlock"]),
                nat_ip=ipaddress.IPv4Address(nat_ip),
            )
        )
        nat_by_subnet[logical_id] = nat_ip
    config = dict(raw, nat_by_subnet=nat_by_subnet)
    # What CloudFormation fills in at deploy becomes the lab's placeholders; anything else unresolved
    # means the user data grew a value the lab does not know how to provide.
    if intrinsic(config["region"]) == {"Ref": "AWS::Region"}:
        config["region"] = REGION
    if intrinsic(config["allocation_id"]):
        config["allocation_id"] = ALLOCATION_ID
    hook = config.get("lifecycle_hook")
    if hook and intrinsic(hook["auto_scaling_group"]):
        config["lifecycle_hook"] = dict(hook, auto_scaling_group=AUTO_SCALING_GROUP)
    signal = config.get("signal")
    if signal and intrinsic(signal["stack"]) == {"Ref": "AWS::StackName"}:
        config["signal"] = dict(signal, stack=STACK_NAME)
    left = [token for token in intrinsics if token in json.dumps(config)]
    if left:
        raise RuntimeError(
            f"synth: the config carries values the lab cannot fill: {[intrinsics[t] for t in left]}"
        )
    return Spec(
        source=note,
        vpc_cidr=ipaddress.IPv4Network(vpcs[0]["Properties"]["CidrBlock"]),
        subnets=tuple(sorted(subnets, key=lambda s: s.az_index)),
        config=config,
    )


def _flatten(user_data: Any) -> tuple[str, dict[str, dict[str, Any]]]:
    """User data's Fn::Join as one string, each CloudFormation intrinsic replaced by a placeholder."""
    if isinstance(user_data, dict) and "Fn::Base64" in user_data:
        user_data = user_data["Fn::Base64"]
    if isinstance(user_data, str):
        return user_data, {}
    separator, parts = user_data["Fn::Join"]
    intrinsics: dict[str, dict[str, Any]] = {}
    pieces = []
    for part in parts:
        if isinstance(part, str):
            pieces.append(part)
        else:
            placeholder = f"@@cfn{len(intrinsics)}@@"
            intrinsics[placeholder] = part
            pieces.append(placeholder)
    return separator.join(pieces), intrinsics


def _config_in(text: str) -> dict[str, Any]:
    """The JSON object in the user data that holds `nat_by_subnet` (the payload's configuration)."""
    anchor = text.index('"nat_by_subnet"')
    decoder = json.JSONDecoder()
    start = text.rfind("{", 0, anchor)
    while start >= 0:
        try:
            found, _end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            found = None
        if isinstance(found, dict) and "nat_by_subnet" in found:
            return found
        start = text.rfind("{", 0, start)
    raise RuntimeError("synth: no JSON configuration found in the user data")


def network_config(config: dict[str, Any], network_egress: str) -> dict[str, Any]:
    """The payload configuration for a network whose `network.egress` is `ipv6` or `interface-endpoints`,
    made from the nat-instances synth: what the stacks write for those networks differs only in these
    keys — `"egress": "direct"`, `"dualstack": true` for ipv6, and no `nat_by_subnet` (no NAT).

    The lab builds those two configurations this way until the app synthesizes them; then they can be
    read from that synth like the nat-instances one.
    """
    if network_egress not in ("ipv6", "interface-endpoints"):
        raise ValueError(f"network.egress {network_egress!r}: only ipv6 and interface-endpoints are derived")
    derived = {key: value for key, value in config.items() if key not in ("nat_by_subnet", "dualstack")}
    derived["egress"] = "direct"
    if network_egress == "ipv6":
        derived["dualstack"] = True
    return derived


def render_config(
    spec: Spec,
    *,
    region: str,
    subnet_ids: dict[str, str],
    allocation_id: str,
    auto_scaling_group: str,
    endpoints: dict[str, str],
    deadline_seconds: int | None = None,
) -> dict[str, Any]:
    """The synthesized configuration with the deploy-time values the lab's moto chose, plus endpoints."""
    text = json.dumps(spec.config)
    for placeholder, value in [
        (REGION, region),
        (ALLOCATION_ID, allocation_id),
        (AUTO_SCALING_GROUP, auto_scaling_group),
        *subnet_ids.items(),
    ]:
        text = text.replace(json.dumps(placeholder), json.dumps(value))
    config: dict[str, Any] = json.loads(text)
    config.update(endpoints)
    # The lab's emulators speak plain HTTP, which the payload accepts only in a test configuration.
    config["test"] = True
    if deadline_seconds is not None:
        config["deadline_seconds"] = deadline_seconds
    return config
