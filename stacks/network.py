"""The shared network: VPC, public and private subnets per AZ, the API egress of its mode, S3 endpoint,
flow logs."""

from __future__ import annotations

from typing import Any

from aws_cdk import CfnResource, Fn, ReferenceStrength, RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_events as events
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from constructs import Construct

from .config import EGRESS_IPV6, NetworkConfig
from .endpoints import ApiEndpoints
from .monitoring import Alerts, launch_failure_rule
from .nat import NatInstance, StableNatProvider

# CloudWatch Logs' retention periods by their length in days (the config speaks days).
FLOW_LOG_RETENTION = {
    1: logs.RetentionDays.ONE_DAY,
    3: logs.RetentionDays.THREE_DAYS,
    5: logs.RetentionDays.FIVE_DAYS,
    7: logs.RetentionDays.ONE_WEEK,
    14: logs.RetentionDays.TWO_WEEKS,
    30: logs.RetentionDays.ONE_MONTH,
    60: logs.RetentionDays.TWO_MONTHS,
    90: logs.RetentionDays.THREE_MONTHS,
    120: logs.RetentionDays.FOUR_MONTHS,
    150: logs.RetentionDays.FIVE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
    400: logs.RetentionDays.THIRTEEN_MONTHS,
    545: logs.RetentionDays.EIGHTEEN_MONTHS,
    731: logs.RetentionDays.TWO_YEARS,
    1096: logs.RetentionDays.THREE_YEARS,
    1827: logs.RetentionDays.FIVE_YEARS,
    2192: logs.RetentionDays.SIX_YEARS,
    2557: logs.RetentionDays.SEVEN_YEARS,
    2922: logs.RetentionDays.EIGHT_YEARS,
    3288: logs.RetentionDays.NINE_YEARS,
    3653: logs.RetentionDays.TEN_YEARS,
}


class Network(Construct):
    """The VPC and what every healing service in it relies on.

    `network.egress` decides how an instance without a public IPv4 reaches the EC2 API: NAT instances
    (`nat_by_subnet` pairs each public subnet with the stable NAT address in its AZ: the source of the
    subnet→NAT map in the services' user data), IPv6 through the internet gateway, or interface
    endpoints. The VPC is a new one, or a team's own (`network.vpc_id`), to which only what it lacks is
    added.
    """

    def __init__(
        self, scope: Construct, construct_id: str, *, config: NetworkConfig, alarm_topic_arn: str | None
    ) -> None:
        super().__init__(scope, construct_id)
        self.config = config
        self.alerts = Alerts(self, "Alerts", topic_arn=alarm_topic_arn)
        self.nat_provider: StableNatProvider | None = None
        if config.uses_nat_instances:
            self.nat_provider = StableNatProvider(
                vpc_cidr=config.cidr,
                instance_type=config.nat_instance_type,
                arm64=config.nat_is_arm64,
                group_prefix=Stack.of(self).stack_name,
                topic=self.alerts.topic,
            )
        self.vpc: ec2.IVpc
        self.public_subnets: list[ec2.ISubnet]
        if config.is_existing_vpc:
            self.vpc, self.public_subnets = self._existing_vpc(config)
        else:
            self.vpc = self._new_vpc(config)
            self.public_subnets = list(self.vpc.public_subnets)
        self.api_endpoints: ApiEndpoints | None = None
        if config.endpoints_to_add:
            self.api_endpoints = ApiEndpoints(
                self,
                "ApiEndpoints",
                vpc=self.vpc,
                vpc_cidr=config.cidr,
                subnets=self.public_subnets,
                services=config.endpoints_to_add,
            )
        self.flow_log_group = logs.LogGroup(
            self,
            "FlowLogs",
            retention=FLOW_LOG_RETENTION[config.flow_log_retention_days],
            encryption_key=self.alerts.key,
            # The record of who talked to the NATs outlives the network (it expires by its retention).
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.flow_log = self.vpc.add_flow_log(
            "FlowLog",
            destination=ec2.FlowLogDestination.to_cloud_watch_logs(self.flow_log_group),
            traffic_type=ec2.FlowLogTrafficType.ALL,
        )
        if not config.is_existing_vpc:
            # The subnets and the VPC that running services sit in are referenced strongly (exports):
            # CloudFormation then refuses a network deploy that would replace them under a service, where
            # a weak reference (the app's default, cdk.json) would let it through and leave the service's
            # configuration naming subnets that no longer exist. The alert topic stays weak: switching to
            # a team's own topic must not lock the network stack (docs/deploy.md, "Cross-stack
            # references"). A team's own VPC and subnets are literal ids: nothing to reference.
            for held in [self.vpc, *self.public_subnets]:
                resource = held.node.default_child
                assert isinstance(resource, CfnResource)
                resource.apply_cross_stack_reference_strength(ReferenceStrength.STRONG)
        self.nat_launch_failures: events.CfnRule | None = None
        if self.nat_instances:
            self.nat_launch_failures = launch_failure_rule(
                self,
                "NatLaunchFailed",
                group_names=[nat.group_name for nat in self.nat_instances],
                topic=self.alerts.topic,
            )

    def _new_vpc(self, config: NetworkConfig) -> ec2.Vpc:
        """A VPC with a public and a private subnet per AZ; its private subnets' egress follows the mode."""
        if config.uses_nat_instances:
            private_type = ec2.SubnetType.PRIVATE_WITH_EGRESS
        elif config.egress == EGRESS_IPV6:
            # IPv6 only, through the egress-only internet gateway CDK adds for a dual-stack VPC.
            private_type = ec2.SubnetType.PRIVATE_WITH_EGRESS
        else:
            # Interface endpoints: no route out of the VPC at all (README, "Network choices").
            private_type = ec2.SubnetType.PRIVATE_ISOLATED
        dual_stack = config.egress == EGRESS_IPV6
        return ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr(config.cidr),
            # An Amazon-provided /56, a /64 per subnet, ::/0 to the internet gateway from the public
            # subnets and to an egress-only gateway from the private ones.
            ip_protocol=ec2.IpProtocol.DUAL_STACK if dual_stack else None,
            max_azs=config.az_count,
            nat_gateway_provider=self.nat_provider,
            # Without NAT instances, no NAT of any kind (CDK would otherwise add managed NAT gateways).
            nat_gateways=None if config.uses_nat_instances else 0,
            subnet_configuration=[
                ec2.SubnetConfiguration(
                    name="Public",
                    subnet_type=ec2.SubnetType.PUBLIC,
                    cidr_mask=config.subnet_prefix_length,
                    # Nothing gets a public IPv4 by accident: the NATs ask for one, the healed
                    # instances must boot without one (that is the whole trick).
                    map_public_ip_on_launch=False,
                ),
                ec2.SubnetConfiguration(
                    name="Private",
                    subnet_type=private_type,
                    cidr_mask=config.subnet_prefix_length,
                ),
            ],
            # Clearing the default security group's rules takes a Lambda-backed custom resource; nothing
            # here uses that group, and the app deploys no Lambda.
            restrict_default_security_group=False,
            # Free, and lets an instance without a public IPv4 fetch its payload from S3; by default it
            # is routed from every subnet's route table.
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)
            },
        )

    def _existing_vpc(self, config: NetworkConfig) -> tuple[ec2.IVpc, list[ec2.ISubnet]]:
        """A team's own VPC from the ids the configuration states: no lookup, no account needed at synth.

        The app adds what the mode needs and the VPC lacks: NAT instances in the public subnets, the S3
        gateway endpoint on their route tables, the interface endpoints not already there.
        """
        assert config.vpc_id is not None
        subnets: list[ec2.ISubnet] = [
            ec2.Subnet.from_subnet_attributes(
                self,
                f"PublicSubnet{index + 1}",
                subnet_id=subnet.subnet_id,
                availability_zone=subnet.availability_zone,
                ipv4_cidr_block=subnet.cidr,
                route_table_id=subnet.route_table_id,
            )
            for index, subnet in enumerate(config.public_subnets)
        ]
        vpc = ec2.Vpc.from_vpc_attributes(
            self,
            "Vpc",
            vpc_id=config.vpc_id,
            vpc_cidr_block=config.cidr,
            availability_zones=[s.availability_zone for s in config.public_subnets],
            public_subnet_ids=[s.subnet_id for s in config.public_subnets],
            public_subnet_route_table_ids=[s.route_table_id for s in config.public_subnets],
        )
        if self.nat_provider is not None:
            # Only the NATs: the team's private subnets keep their own routes.
            self.nat_provider.add_nats(self, vpc=vpc, nat_subnets=subnets)
        if "s3" not in config.existing_endpoints:
            ec2.GatewayVpcEndpoint(
                self,
                "S3Endpoint",
                vpc=vpc,
                service=ec2.GatewayVpcEndpointAwsService.S3,
                # The user data fetches the payload through it before the instance has any way out.
                subnets=[ec2.SubnetSelection(subnets=subnets)],
            )
        return vpc, subnets

    @property
    def vpc_arn(self) -> str:
        return Stack.of(self).format_arn(service="ec2", resource="vpc", resource_name=self.vpc.vpc_id)

    @property
    def nat_instances(self) -> list[NatInstance]:
        return self.nat_provider.instances if self.nat_provider is not None else []

    @property
    def nat_by_subnet(self) -> list[tuple[ec2.ISubnet, str]]:
        """Each public subnet with the private IPv4 of the NAT instance in its AZ (none without NATs)."""
        by_az = {nat.subnet.availability_zone: nat.private_ip for nat in self.nat_instances}
        if not by_az:
            return []
        return [(subnet, by_az[subnet.availability_zone]) for subnet in self.public_subnets]

    # What a healing service reads of its network (stacks.service_network.ServiceNetwork).
    @property
    def payload_egress(self) -> str:
        return self.config.payload_egress

    @property
    def payload_dualstack(self) -> bool:
        return self.config.payload_dualstack

    @property
    def alert_topic(self) -> sns.ITopic:
        return self.alerts.topic


class NetworkStack(Stack):
    """Deploys the shared `Network`."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: NetworkConfig,
        alarm_topic_arn: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._az_count = config.az_count
        self._existing_azs = [s.availability_zone for s in config.public_subnets]
        super().__init__(scope, construct_id, **kwargs)
        self.network = Network(self, "Network", config=config, alarm_topic_arn=alarm_topic_arn)

    @property
    def availability_zones(self) -> list[str]:
        if self._existing_azs:
            # A team's own VPC: the AZs of the public subnets it names.
            return list(self._existing_azs)
        # An env-agnostic stack offers only two AZs; select as many as configured from the deploy
        # region's list instead, still with no lookup at synth.
        return [Fn.select(i, Fn.get_azs()) for i in range(self._az_count)]
