"""What a healing service needs of its network, from the app's `Network` or from any `ec2.IVpc`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from aws_cdk import Token
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_sns as sns

from .config import NAT_EGRESS_CHOICES, ConfigError

if TYPE_CHECKING:
    from .nat import StableNatProvider

# The payload's egress that changes nothing on the host (bootstrap/egress).
DIRECT = "direct"


class ServiceNetwork(Protocol):
    """The network facts a `HealingGroup` reads: where it runs, how it reaches the EC2 API before it
    holds its address, and where its alarms go. The app's `Network` has them; `VpcNetwork` states them
    for a team's own VPC."""

    @property
    def vpc(self) -> ec2.IVpc: ...

    @property
    def public_subnets(self) -> Sequence[ec2.ISubnet]: ...

    @property
    def vpc_arn(self) -> str: ...

    @property
    def nat_by_subnet(self) -> Sequence[tuple[ec2.ISubnet, str]]: ...

    @property
    def payload_egress(self) -> str: ...

    @property
    def payload_dualstack(self) -> bool: ...

    @property
    def alert_topic(self) -> sns.ITopic: ...


@dataclass(frozen=True)
class Egress:
    """How an instance that boots without a public IPv4 reaches the EC2 API to take its address.

    Stated by the caller, because only the caller knows what its VPC offers. Build one with
    `stable_nat`, `nat_addresses`, `ipv6` or `interface_endpoints`.
    """

    payload_egress: str
    dualstack: bool = False
    _provider: StableNatProvider | None = field(default=None, repr=False)
    _addresses: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def stable_nat(cls, provider: StableNatProvider, *, strategy: str = NAT_EGRESS_CHOICES[0]) -> Egress:
        """Through the NAT instance of each subnet's AZ that `provider` gave the VPC (`StableNatProvider`).

        `strategy` is the payload's way of sending only its own API calls there: "policy-route" (its
        own routing table, the main one untouched) or "main-table" (the default route, restored after).
        """
        return cls(payload_egress=_strategy(strategy), _provider=provider)

    @classmethod
    def nat_addresses(cls, by_subnet: Mapping[str, str], *, strategy: str = NAT_EGRESS_CHOICES[0]) -> Egress:
        """Through NATs the caller already runs: each subnet id to the NAT's private IPv4 in its AZ.

        The address must stay the NAT's for good (a standalone network interface, as `StableNatProvider`
        makes): it is written into the instances' configuration at deploy.
        """
        if not by_subnet:
            raise ConfigError("egress.nat_addresses", "needs a NAT address for every subnet of the service")
        return cls(payload_egress=_strategy(strategy), _addresses=dict(by_subnet))

    @classmethod
    def ipv6(cls) -> Egress:
        """Over IPv6 through the internet gateway: the subnets must be dual-stack (an IPv6 block, ::/0 to
        the internet gateway). Auto Scaling has no IPv6 endpoint, hence no warm pool with it."""
        return cls(payload_egress=DIRECT, dualstack=True)

    @classmethod
    def interface_endpoints(cls) -> Egress:
        """Through the VPC's interface endpoints, with private DNS, for ec2, autoscaling, cloudformation
        and monitoring (CloudWatch), reachable on 443 from the service's subnets."""
        return cls(payload_egress=DIRECT)

    @property
    def uses_nat(self) -> bool:
        return self.payload_egress != DIRECT

    def nat_by_subnet(self, subnets: Sequence[ec2.ISubnet]) -> list[tuple[ec2.ISubnet, str]]:
        """Each subnet with the NAT address its instances detour through; [] without NATs."""
        if not self.uses_nat:
            return []
        if self._provider is not None:
            by_az = {nat.subnet.availability_zone: nat.private_ip for nat in self._provider.instances}
            if not by_az:
                raise ConfigError(
                    "egress.stable_nat",
                    "the provider has no NAT instances: pass it to ec2.Vpc(nat_gateway_provider=...) first",
                )
            pairs = []
            for subnet in subnets:
                if subnet.availability_zone not in by_az:
                    raise ConfigError(
                        "egress.stable_nat",
                        f"no NAT instance in the availability zone of subnet {subnet.node.path}",
                    )
                pairs.append((subnet, by_az[subnet.availability_zone]))
            return pairs
        pairs = []
        for subnet in subnets:
            address = self._addresses.get(subnet.subnet_id)
            if address is None:
                name = subnet.node.path if Token.is_unresolved(subnet.subnet_id) else subnet.subnet_id
                raise ConfigError("egress.nat_addresses", f"no NAT address for subnet {name}")
            pairs.append((subnet, address))
        return pairs


@dataclass(frozen=True)
class VpcNetwork:
    """`ServiceNetwork` for a caller's VPC: the subnets the service's group spans and its stated egress."""

    vpc: ec2.IVpc
    public_subnets: Sequence[ec2.ISubnet]
    egress: Egress
    alert_topic: sns.ITopic
    vpc_arn: str

    @property
    def nat_by_subnet(self) -> Sequence[tuple[ec2.ISubnet, str]]:
        return self.egress.nat_by_subnet(self.public_subnets)

    @property
    def payload_egress(self) -> str:
        return self.egress.payload_egress

    @property
    def payload_dualstack(self) -> bool:
        return self.egress.dualstack


def _strategy(strategy: str) -> str:
    if strategy not in NAT_EGRESS_CHOICES:
        raise ConfigError(
            "egress.strategy", f"{strategy!r} is not one of {', '.join(map(repr, NAT_EGRESS_CHOICES))}"
        )
    return strategy
