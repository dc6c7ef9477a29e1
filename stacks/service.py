"""`HealingService`: one self-healing instance and its Elastic IP, in any VPC the caller has."""

from __future__ import annotations

import re
from collections.abc import Sequence

from aws_cdk import Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_sns as sns
from constructs import Construct

from . import nag
from .bundle import BundleInfo, build_bundle
from .config import (
    HANDOVER_TERMINATE_FIRST,
    ConfigError,
    HealthCheckConfig,
    ServiceConfig,
    _health_check,
    _service,
)
from .healing_service import ELASTIC_IP_LOGICAL_ID, ElasticAddress, HealingGroup
from .monitoring import Alerts
from .service_network import Egress, VpcNetwork

# The library's default instance type, the configuration's too.
_DEFAULT_INSTANCE_TYPE = "t4g.micro"
# CloudFormation and Auto Scaling take group names of up to 255 characters.
_GROUP_NAME_LIMIT = 255
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


class HealingService(Construct):
    """An Elastic IP and a group of one instance, over the selected subnets, whose every boot takes it.

    The instance boots without a public IPv4, reaches the EC2 API the way ``egress`` says, takes the
    address and reports to its lifecycle hook and to CloudFormation. Alarms go to ``alert_topic``; without
    one the service makes its own (an encrypted topic, its key and a dashboard), which others can share
    through ``service.alert_topic``.

    The subnets (``vpc_subnets``, by default the VPC's public ones, ideally one per AZ) must route
    0.0.0.0/0 to an internet gateway and have an S3 gateway endpoint: the instance fetches its payload
    through it before it holds any address. The cdk-nag findings it accepts by design are acknowledged on
    its own constructs, each with its reason.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        vpc: ec2.IVpc,
        egress: Egress,
        name: str | None = None,
        vpc_subnets: ec2.SubnetSelection | None = None,
        instance_type: str = _DEFAULT_INSTANCE_TYPE,
        ingress_ports: Sequence[int] = (443,),
        ingress_cidr: str = "0.0.0.0/0",
        allocation_id: str | None = None,
        root_volume_gib: int = 8,
        warm_pool: bool = False,
        health_check: HealthCheckConfig | None = None,
        handover: str = HANDOVER_TERMINATE_FIRST,
        spot_instance_types: Sequence[str] | None = None,
        alert_topic: sns.ITopic | None = None,
        bundle: BundleInfo | None = None,
    ) -> None:
        """``name`` (default: the construct id in lower case) names the service in its tags, metrics and
        group; ``allocation_id`` adopts an existing Elastic IP instead of allocating one (kept when the
        stack goes either way); ``handover`` is ``"terminate-first"`` (exactly one instance, always) or
        ``"launch-first"`` (a second one while one replaces the other: deploys, health replacements,
        Spot); ``spot_instance_types`` (two or more of one architecture, needs launch-first, replaces
        ``instance_type``) runs the instance on Spot with Capacity Rebalancing; ``bundle`` is the
        payload (default: built once and cached, see `build_bundle`).
        """
        super().__init__(scope, construct_id)
        service_name = name if name is not None else construct_id.lower()
        # The app's own validation, so the library refuses what the cdk.json shape refuses, naming the prop.
        raw: dict[str, object] = {
            "name": service_name,
            "ingress_ports": list(ingress_ports),
            "ingress_cidr": ingress_cidr,
            "root_volume_gib": root_volume_gib,
            "warm_pool": warm_pool,
            "handover": handover,
        }
        # With Spot the types are spot_instance_types; an instance_type beside them is refused.
        if spot_instance_types is None or instance_type != _DEFAULT_INSTANCE_TYPE:
            raw["instance_type"] = instance_type
        if spot_instance_types is not None:
            raw["spot"] = {"instance_types": list(spot_instance_types)}
        if allocation_id is not None:
            raw["allocation_id"] = allocation_id
        self.config: ServiceConfig = _service(raw, f"HealingService({construct_id})")
        if health_check is not None:
            # The same checks as the cdk.json shape (a path on 443 needs tls), naming the prop.
            checked = _health_check(vars(health_check), f"HealingService({construct_id}).health_check")
            self.config = ServiceConfig(**{**vars(self.config), "health_check": checked})
        if warm_pool and egress.dualstack:
            raise ConfigError(
                f"HealingService({construct_id}).warm_pool",
                "not with Egress.ipv6(): a warming instance has no way to Auto Scaling (no IPv6 endpoint)",
            )
        # The public subnets by default: an instance uses its Elastic IP through an internet gateway.
        selection = vpc_subnets or ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC)
        subnets = vpc.select_subnets(
            availability_zones=selection.availability_zones,
            one_per_az=selection.one_per_az,
            subnet_filters=selection.subnet_filters,
            subnet_group_name=selection.subnet_group_name,
            subnets=selection.subnets,
            subnet_type=selection.subnet_type,
        ).subnets
        if not subnets:
            raise ConfigError(f"HealingService({construct_id}).vpc_subnets", "selects no subnet")

        stack = Stack.of(self)
        group_name = f"{stack.stack_name}-{service_name}"
        if len(group_name) > _GROUP_NAME_LIMIT:
            raise ConfigError(
                f"HealingService({construct_id}).name",
                f"the group name {group_name!r} is longer than {_GROUP_NAME_LIMIT} characters",
            )
        self.alerts: Alerts | None = None
        if alert_topic is None:
            self.alerts = Alerts(self, "Alerts", topic_arn=None)
            alert_topic = self.alerts.topic
        self.alert_topic: sns.ITopic = alert_topic
        self.network = VpcNetwork(
            vpc=vpc,
            public_subnets=list(subnets),
            egress=egress,
            alert_topic=alert_topic,
            vpc_arn=stack.format_arn(service="ec2", resource="vpc", resource_name=vpc.vpc_id),
        )
        # Checked now, so that a subnet without a NAT fails here and not inside the group.
        self.network.egress.nat_by_subnet(self.network.public_subnets)
        self.address = ElasticAddress(self, "Address", config=self.config)
        if self.address.eip is not None:
            # Pinned by the construct id (the app pins one per stack): renaming the construct would make
            # CloudFormation allocate a new address, and the retained old one would sit unused.
            self.address.eip.override_logical_id(_logical_id(construct_id) + ELASTIC_IP_LOGICAL_ID)
        self.healing_group = HealingGroup(
            self,
            "Healing",
            config=self.config,
            network=self.network,
            address=self.address,
            bundle=bundle if bundle is not None else build_bundle(),
            group_name=group_name,
        )
        nag.acknowledge_service(self.healing_group, self.config)

    @property
    def allocation_id(self) -> str:
        """The Elastic IP's allocation id (a CloudFormation reference when the service allocates it)."""
        return self.address.allocation_id

    @property
    def public_ip(self) -> str | None:
        """The Elastic IP itself; None for an adopted address (its allocation id is all the stack knows)."""
        return self.address.public_ip

    @property
    def group_name(self) -> str:
        return self.healing_group.group_name


def _logical_id(construct_id: str) -> str:
    """The construct id as CloudFormation allows a logical ID to start: letters and digits only."""
    return _NOT_ALNUM.sub("", construct_id)
