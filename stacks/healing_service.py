"""One healing service: its Elastic IP, and a group of one instance that takes the address at boot."""

from __future__ import annotations

from typing import Any

from aws_cdk import ArnFormat, Aws, CfnOutput, Duration, RemovalPolicy, Stack, Tags
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from constructs import Construct

from .bundle import BundleInfo
from .config import ServiceConfig
from .launch_hook import hold_launches
from .monitoring import METRICS_NAMESPACE, ServiceAlarms
from .payload_config import DEADLINE_SECONDS, payload_config
from .service_network import ServiceNetwork
from .user_data import payload_user_data

# The tag that names a service on its instances (for people and cost reports; IAM relies on the
# reserved aws:autoscaling:groupName instead, which no one can set by hand).
SERVICE_TAG = "eip-reclaim:service"
GROUP_TAG = "aws:autoscaling:groupName"
# The logical ID of the address, pinned: a refactoring that renamed it would make CloudFormation
# allocate a new address and leave the one clients know orphaned.
ELASTIC_IP_LOGICAL_ID = "ElasticIp"
LIFECYCLE_HOOK_NAME = "eip-reclaim-launch"
# The hook's window is counted from launch, not from the payload's start: it must cover the boot and
# the user data's install, a first run to its deadline, the unit's restart delay, and the one retry
# that a transient failure (exit 75) earns. Past it, the default result (ABANDON) lets the group
# replace the instance.
BOOT_ALLOWANCE_SECONDS = 120
# The boot unit's RestartSec (deploy/systemd/eip-reclaim.service); a test keeps the two equal.
UNIT_RESTART_SECONDS = 30
HOOK_HEARTBEAT = Duration.seconds(BOOT_ALLOWANCE_SECONDS + 2 * (DEADLINE_SECONDS + UNIT_RESTART_SECONDS))
# The design's group: exactly one instance (min = max = desired = 1). With handover "launch-first" the
# group may hold a second one while one replaces the other (a deploy, a health replacement, a Spot
# rebalance); the desired capacity stays 1 and nothing scales it.
GROUP_SIZE = 1
LAUNCH_FIRST_MAX_SIZE = 2
# An instance maintenance policy, as percentages of the desired capacity (1): launch-first keeps the
# unhealthy instance until its replacement is in service (100) and allows one more beside it (200).
LAUNCH_FIRST_HEALTHY_PERCENTAGES = (100, 200)
# An instance refresh (the warm pool's update policy) that terminates first: none kept, none extra.
TERMINATE_FIRST_HEALTHY_PERCENTAGES = (0, 100)
# Spot: the cheapest pools with the least risk of interruption, and no on-demand base.
SPOT_ALLOCATION = autoscaling.SpotAllocationStrategy.PRICE_CAPACITY_OPTIMIZED
# The warm pool: one stopped instance. Its size would default to MaxSize - desired (0 or 1 by the
# handover); its own minimum and the prepared capacity say it outright. The same launch
# hook holds it twice, on the way into the pool (first boot: install, byte-compile, CONTINUE) and on
# the way out (a start: the payload claims): each transition is its own action with the hook's full
# window, and the first boot, the longer of the two, is the one HOOK_HEARTBEAT is sized for.
WARM_POOL_SIZE = 1
# The watchdog's timer period (OnUnitActiveSec of deploy/systemd/eip-reclaim-watchdog.timer); a test
# keeps the two equal.
WATCHDOG_PERIOD_SECONDS = 10


class ElasticAddress(Construct):
    """The service's Elastic IP: created and kept when the stack goes, or an existing one adopted."""

    def __init__(self, scope: Construct, construct_id: str, *, config: ServiceConfig) -> None:
        super().__init__(scope, construct_id)
        self.eip: ec2.CfnEIP | None = None
        self.public_ip: str | None = None
        if config.allocation_id is not None:
            self.allocation_id = config.allocation_id
        else:
            self.eip = ec2.CfnEIP(self, "Eip", domain="vpc")
            self.eip.apply_removal_policy(RemovalPolicy.RETAIN)
            self.eip.override_logical_id(ELASTIC_IP_LOGICAL_ID)
            self.allocation_id = self.eip.attr_allocation_id
            self.public_ip = self.eip.attr_public_ip
        self.arn = Stack.of(self).format_arn(
            service="ec2", resource="elastic-ip", resource_name=self.allocation_id
        )


class HealingGroup(Construct):
    """A group of exactly one instance over the public subnets of every AZ, whose boot takes the address."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ServiceConfig,
        network: ServiceNetwork,
        address: ElasticAddress,
        bundle: BundleInfo,
        group_name: str,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.group_name = group_name
        self.group_arn = stack.format_arn(
            service="autoscaling",
            resource="autoScalingGroup",
            resource_name=f"*:autoScalingGroupName/{group_name}",
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )

        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description=f"eip-reclaim {config.name}: take this service's Elastic IP at boot",
            # Session Manager instead of SSH keys and an open port 22.
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")],
        )
        self.role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="FindTheAddressAndItsHolder",
                # Neither action has a resource type: "*" is the only resource they accept. The payload
                # reads the holder's launch time and group so that it never takes the address back from
                # a newer member of its own group.
                actions=["ec2:DescribeAddresses", "ec2:DescribeInstances"],
                resources=["*"],
            )
        )
        self.role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="TakeThisAddress",
                actions=["ec2:AssociateAddress"],
                resources=[address.arn],
            )
        )
        self.role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="OnlyOntoThisGroupsInstances",
                actions=["ec2:AssociateAddress"],
                resources=[stack.format_arn(service="ec2", resource="instance", resource_name="*")],
                # Auto Scaling sets this tag and no one else can: ec2:CreateTags cannot forge it.
                conditions={"StringEquals": {f"aws:ResourceTag/{GROUP_TAG}": group_name}},
            )
        )
        self.role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="ThroughInterfacesOfThisVpc",
                # EC2 may authorize the association on the instance's primary interface as well; the
                # Elastic IP's ARN above stays what limits what the role can take.
                actions=["ec2:AssociateAddress"],
                resources=[stack.format_arn(service="ec2", resource="network-interface", resource_name="*")],
                conditions={"StringEquals": {"ec2:Vpc": network.vpc_arn}},
            )
        )
        self.role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="ReportTheLaunch",
                actions=["autoscaling:CompleteLifecycleAction"],
                resources=[self.group_arn],
            )
        )
        if config.health_check is not None:
            self.role.add_to_principal_policy(
                iam.PolicyStatement(
                    sid="ReportItsOwnHealth",
                    # The watchdog marks its own instance unhealthy; the action has no condition key that
                    # could pin the instance, so the group's ARN is the narrowest grant.
                    actions=["autoscaling:SetInstanceHealth"],
                    resources=[self.group_arn],
                )
            )
        self.role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="PublishHealMetrics",
                # PutMetricData has no resource type; the namespace condition is its only limit.
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringEquals": {"cloudwatch:namespace": METRICS_NAMESPACE}},
            )
        )

        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=network.vpc,
            description=f"eip-reclaim {config.name}: the service ports",
            allow_all_outbound=True,
            # In an IPv6 network the EC2 API is reached over IPv6 before the address is claimed.
            allow_all_ipv6_outbound=network.payload_dualstack,
        )
        for port in config.ingress_ports:
            self.security_group.add_ingress_rule(
                ec2.Peer.ipv4(config.ingress_cidr), ec2.Port.tcp(port), f"service port {port}"
            )
        if 80 in config.ingress_ports and config.ingress_cidr == "0.0.0.0/0":
            # checkov CKV_AWS_260 flags port 80 open to the world: here it is the configuration's intent.
            cfn_security_group = self.security_group.node.default_child
            assert isinstance(cfn_security_group, ec2.CfnSecurityGroup)
            cfn_security_group.add_metadata(
                "checkov",
                {
                    "skip": [
                        {
                            "id": "CKV_AWS_260",
                            "comment": f"Service {config.name} is configured to serve port 80 to the "
                            "internet (ingress_ports, ingress_cidr); nothing else is open.",
                        }
                    ]
                },
            )

        # Filled below, once the configuration can name the group's logical ID (the launch template
        # renders its user data at synth).
        self.user_data = ec2.UserData.for_linux()
        cpu = ec2.AmazonLinuxCpuType.ARM_64 if config.is_arm64 else ec2.AmazonLinuxCpuType.X86_64
        self.launch_template = ec2.LaunchTemplate(
            self,
            "LaunchTemplate",
            machine_image=ec2.MachineImage.latest_amazon_linux2023(cpu_type=cpu),
            instance_type=ec2.InstanceType(config.launch_type),
            role=self.role,
            security_group=self.security_group,
            user_data=self.user_data,
            # The instance must boot without a public IPv4: its Elastic IP is its only way out.
            associate_public_ip_address=False,
            http_endpoint=True,
            http_tokens=ec2.LaunchTemplateHttpTokens.REQUIRED,
            # One hop: a container on the instance cannot reach IMDS and borrow the instance's role.
            http_put_response_hop_limit=1,
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/xvda",
                    volume=ec2.BlockDeviceVolume.ebs(
                        config.root_volume_gib,
                        encrypted=True,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        delete_on_termination=True,
                    ),
                )
            ],
        )

        if network.payload_dualstack:
            cfn_template = self.launch_template.node.default_child
            assert isinstance(cfn_template, ec2.CfnLaunchTemplate)
            # Escape hatch: LaunchTemplate has no IPv6 property. One IPv6 address on the primary
            # interface is the instance's way to the EC2 API's dual-stack endpoint before it holds the
            # Elastic IP (IMDS stays on IPv4).
            cfn_template.add_property_override("LaunchTemplateData.NetworkInterfaces.0.Ipv6AddressCount", 1)

        # The alarms exist before the group: a warm pool's deploy (an instance refresh) watches `Abandoned`.
        self.alarms = ServiceAlarms(
            self, "Alarms", service=config.name, group_name=group_name, topic=network.alert_topic
        )
        self.group = autoscaling.AutoScalingGroup(
            self,
            "Group",
            vpc=network.vpc,
            vpc_subnets=ec2.SubnetSelection(subnets=network.public_subnets),
            # With Spot the template is named by the mixed instances policy instead.
            launch_template=None if config.spot else self.launch_template,
            mixed_instances_policy=_spot_policy(config, self.launch_template),
            # Capacity Rebalancing: on a rebalance recommendation Auto Scaling launches the replacement,
            # whose payload takes the address, before the old Spot instance is interrupted.
            capacity_rebalance=True if config.spot else None,
            # One instance is the steady state; launch-first allows a second one only for a handover.
            # CloudFormation launches first in a rolling update only when MinInstancesInService < MaxSize.
            min_capacity=GROUP_SIZE,
            max_capacity=LAUNCH_FIRST_MAX_SIZE if config.launches_first else GROUP_SIZE,
            desired_capacity=GROUP_SIZE,
            # Named, not generated: the role's policy and the user data name the group, and a generated
            # name would make the group depend on its own launch template's user data.
            auto_scaling_group_name=group_name,
            group_metrics=[autoscaling.GroupMetrics(autoscaling.GroupMetric.IN_SERVICE_INSTANCES)],
            health_checks=_health_checks(config),
            # A create waits for the payload's SUCCESS (it sends FAILURE when it abandons): a stack
            # whose instance cannot take its address fails and rolls back. CDK grants the role
            # cloudformation:SignalResource on exactly this stack's id (the action has no finer type).
            signals=autoscaling.Signals.wait_for_count(1, timeout=HOOK_HEARTBEAT),
            update_policy=_update_policy(config, self.alarms),
        )
        cfn_group = self.group.node.default_child
        assert isinstance(cfn_group, autoscaling.CfnAutoScalingGroup)
        if config.launches_first:
            # Escape hatch: the L2 group has no instance maintenance policy. Health replacements (status
            # checks, the watchdog's SetInstanceHealth) then launch the new instance first and terminate
            # the unhealthy one once the new one is in service (its launch hook completed: it holds the
            # address), as the rolling update does for deploys.
            minimum, maximum = LAUNCH_FIRST_HEALTHY_PERCENTAGES
            cfn_group.instance_maintenance_policy = (
                autoscaling.CfnAutoScalingGroup.InstanceMaintenancePolicyProperty(
                    min_healthy_percentage=minimum, max_healthy_percentage=maximum
                )
            )
        Tags.of(self.group).add(SERVICE_TAG, config.name, apply_to_launched_instances=True)
        self.warm_pool: autoscaling.WarmPool | None = None
        if config.warm_pool:
            # Stopped, not running: a Warmed:Running instance would enter service without a boot, and the
            # payload (a boot unit) would never claim. A deploy refreshes the pool's instance too (with a
            # pool the group's update policy is an instance refresh: _update_policy).
            self.warm_pool = self.group.add_warm_pool(
                min_size=WARM_POOL_SIZE,
                max_group_prepared_capacity=WARM_POOL_SIZE + 1,
                pool_state=autoscaling.PoolState.STOPPED,
                reuse_on_scale_in=False,
            )
        hold_launches(self.group, name=LIFECYCLE_HOOK_NAME, timeout_seconds=int(HOOK_HEARTBEAT.to_seconds()))
        # The payload's configuration file (docs/payload.md, "Configuration"); subnet ids, the address and
        # the stack name stay CloudFormation expressions until deploy.
        self.payload_config = payload_config(
            allocation_id=address.allocation_id,
            egress=network.payload_egress,
            dualstack=network.payload_dualstack,
            nat_by_subnet=network.nat_by_subnet,
            auto_scaling_group=group_name,
            lifecycle_hook=LIFECYCLE_HOOK_NAME,
            hook_timeout_seconds=int(HOOK_HEARTBEAT.to_seconds()),
            stack_name=Aws.STACK_NAME,
            group_logical_id=stack.get_logical_id(cfn_group),
            service=config.name,
            health_check=config.health_check,
        )
        # Fetches, verifies and installs the bundle with this configuration; the role may read that one
        # object. A new bundle or configuration changes the user data, hence the launch template.
        payload_user_data(
            self, bundle=bundle, config=self.payload_config, role=self.role, into=self.user_data
        )


def _update_policy(config: ServiceConfig, alarms: ServiceAlarms) -> autoscaling.UpdatePolicy:
    """How a deploy that changes the launch template replaces the instance.

    Without a warm pool: a rolling update of one instance that waits for the payload's SUCCESS, so a
    deploy whose new instance cannot take the address fails and rolls back. Terminate-first
    (MinInstancesInService 0 < MaxSize 1): the old instance goes, then the new one boots. Launch-first
    (1 < MaxSize 2): the new one boots beside the old one and takes the address, then the old one goes.

    With a warm pool a rolling update would replace the in-service instance only and leave the pool's
    on the old launch template version, to serve after the next failover; an instance refresh replaces
    the in-service instance and then the pool's. It waits for the launch hook (the payload's CONTINUE
    after the claim) instead of a signal, and fails, rolling the stack back, when the `Abandoned` alarm
    fires.
    """
    if config.warm_pool:
        minimum, maximum = (
            LAUNCH_FIRST_HEALTHY_PERCENTAGES if config.launches_first else TERMINATE_FIRST_HEALTHY_PERCENTAGES
        )
        return autoscaling.UpdatePolicy.instance_refresh(
            strategy=autoscaling.InstanceRefreshStrategy.ROLLING,
            min_healthy_percentage=minimum,
            max_healthy_percentage=maximum,
            # Only instances of an older configuration are replaced: a deploy without a launch template
            # change leaves the instance and the pool alone.
            skip_matching=True,
            alarms=[alarms.abandoned],
        )
    return autoscaling.UpdatePolicy.rolling_update(
        max_batch_size=1,
        min_instances_in_service=1 if config.launches_first else 0,
        pause_time=HOOK_HEARTBEAT,
        wait_on_resource_signals=True,
    )


def _spot_policy(
    config: ServiceConfig, template: ec2.LaunchTemplate
) -> autoscaling.MixedInstancesPolicy | None:
    """Spot only (no on-demand base or share), over the configured types, cheapest pools of low risk."""
    if config.spot is None:
        return None
    return autoscaling.MixedInstancesPolicy(
        launch_template=template,
        launch_template_overrides=[
            autoscaling.LaunchTemplateOverrides(instance_type=ec2.InstanceType(t))
            for t in config.spot.instance_types
        ],
        instances_distribution=autoscaling.InstancesDistribution(
            on_demand_base_capacity=0,
            on_demand_percentage_above_base_capacity=0,
            spot_allocation_strategy=SPOT_ALLOCATION,
        ),
    )


def _health_checks(config: ServiceConfig) -> autoscaling.HealthChecks | None:
    """EC2 status checks, with a grace period that never hides the watchdog's report.

    The group's grace period starts when the instance enters service, just after the payload's claim
    (its CONTINUE); the watchdog's own grace starts at the claim. An Unhealthy sent with
    ShouldRespectGracePeriod inside the group's grace would be ignored, and the watchdog reports once:
    so the group's grace ends a timer period before the watchdog's first possible report.
    """
    if config.health_check is None:
        return None
    grace = max(0, config.health_check.grace_seconds - WATCHDOG_PERIOD_SECONDS)
    return autoscaling.HealthChecks.ec2(grace_period=Duration.seconds(grace))


class HealingServiceStack(Stack):
    """Deploys one healing service into the shared network."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ServiceConfig,
        network: ServiceNetwork,
        bundle: BundleInfo,
        **kwargs: Any,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.service = config
        self.address = ElasticAddress(self, "Address", config=config)
        self.healing_group = HealingGroup(
            self,
            "Healing",
            config=config,
            network=network,
            address=self.address,
            bundle=bundle,
            group_name=self.stack_name,
        )
        if self.address.public_ip is not None:
            CfnOutput(self, "PublicIp", value=self.address.public_ip, description="The service's Elastic IP")
        CfnOutput(
            self,
            "AllocationId",
            value=self.address.allocation_id,
            description="The Elastic IP's allocation id",
        )
        CfnOutput(
            self,
            "AutoScalingGroupName",
            value=self.healing_group.group_name,
            description="The group that keeps one instance holding the address",
        )
