"""What the lab builds, taken from the synthesized app: subnets, NAT addresses, the payload's config.

`load()` synthesizes the default app once and reads the templates; `render_config` turns the
configuration that the instance's user data carries into the lab's, replacing only what the cloud
would fill in at deploy (subnet ids, the allocation id, the region) and adding the lab's endpoints.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any


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
    return hand_written()


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
    if deadline_seconds is not None:
        config["deadline_seconds"] = deadline_seconds
    return config
