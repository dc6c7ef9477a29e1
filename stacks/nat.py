"""NAT instances behind stable addresses: the detour a booting instance takes to reach the EC2 API.

Each AZ has a standalone network interface at a fixed private address (the address every map names and
every private route points at) and a group of one NAT instance that takes that interface over at boot.
An instance can then be replaced (new image, type, user data, security group, a terminated host) while
the interface, its address and the routes stay exactly as they are.
"""

from __future__ import annotations

import ipaddress
import string
from collections.abc import Sequence
from typing import Any

from aws_cdk import ArnFormat, Aws, Duration, Stack, Token
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sns as sns
from constructs import Construct

from . import nag
from .config import is_graviton
from .launch_hook import hold_launches

# AWS reserves the first four addresses of every subnet (network, router, DNS, future use): the fifth
# is the first an interface can hold, and it depends only on the subnet's CIDR, so the maps in user data
# never go stale.
NAT_HOST_OFFSET = 4

# Link-local is where every instance's IMDS, DNS resolver and time server live. A NAT that forwarded
# it would answer a detoured instance with the NAT's own metadata: the bug this product guards against.
LINK_LOCAL = "169.254.0.0/16"

# Amazon Linux 2023, resolved by EC2 at each launch: a new AMI release needs no deploy, and the NAT
# instance that a deploy or a failure replaces boots the current image.
AL2023_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"

# Status checks report once a minute; three failed minutes in a row is a host or OS that will not heal
# by itself, not a blip (the group replaces it; the alarm tells the team).
_STATUS_CHECK_PERIODS = 3
# Where the stable interface goes: the primary (index 0) is the instance's own, with its public IPv4.
STABLE_DEVICE_INDEX = 1
LIFECYCLE_HOOK_NAME = "eip-reclaim-nat-launch"
# The smallest Graviton type: a NAT for one instance's API calls and its own traffic.
DEFAULT_INSTANCE_TYPE = "t4g.nano"
# A NAT boots, installs iptables (retried), attaches the interface and waits for the OS to configure it:
# a few minutes at worst. Past the window the hook's default (ABANDON) replaces it.
NAT_READY_TIMEOUT = Duration.minutes(10)
BOOT_UNIT = "eip-reclaim-nat.service"
# checkov's CKV_AWS_88 (no public IP) fails by design here, and says so in the template.
CHECKOV_PUBLIC_IP = (
    "A NAT instance forwards the VPC's traffic to the internet and calls the EC2 API at boot: it needs "
    "a public IPv4 of its own. Its security group admits only the VPC's addresses."
)
NETWORK_SCRIPT = "/usr/local/sbin/eip-reclaim-nat-network"
BOOT_SCRIPT = "/usr/local/sbin/eip-reclaim-nat-boot"
ENV_FILE = "/etc/eip-reclaim/nat.env"


def nat_address(subnet_cidr: str) -> str:
    """The private IPv4 address of the NAT interface in a public subnet with this CIDR."""
    network = ipaddress.IPv4Network(subnet_cidr)
    return str(network.network_address + NAT_HOST_OFFSET)


def iptables_rules(vpc_cidr: str) -> str:
    """The NAT's packet filter, in iptables-restore format."""
    return "\n".join(
        [
            "*filter",
            ":INPUT ACCEPT [0:0]",
            ":FORWARD DROP [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            f"-A FORWARD -d {LINK_LOCAL} -j DROP",
            "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-A FORWARD -s {vpc_cidr} ! -d {vpc_cidr} -j ACCEPT",
            "COMMIT",
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            ":INPUT ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            ":POSTROUTING ACCEPT [0:0]",
            f"-A POSTROUTING -s {vpc_cidr} ! -d {vpc_cidr} -j MASQUERADE",
            "COMMIT",
            "",
        ]
    )


def nat_network_setup(vpc_cidr: str) -> str:
    """POSIX sh run at every NAT boot (twice: before and after the stable interface arrives); the VPC
    lab runs this same text in its NAT namespaces.

    Forwarding first. ICMP redirects off everywhere: the VPC router, not the NAT, is the next hop a
    redirect would name, and a host that took one would leave the detour. Reverse-path filtering
    loose: with two interfaces in one subnet, packets arrive on the stable interface from sources the
    kernel routes out of the primary, and replies leave the primary with a foreign source (which is why
    its source/dest check is off too).
    """
    return "\n".join(
        [
            "set -eu",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
            "# all, default (interfaces that appear later) and every interface that exists now",
            "for conf in /proc/sys/net/ipv4/conf/*; do",
            '  echo 0 > "$conf/send_redirects"',
            '  echo 2 > "$conf/rp_filter"',
            "done",
            "iptables-restore <<'EIP_RECLAIM_RULES'",
            iptables_rules(vpc_cidr).rstrip("\n"),
            "EIP_RECLAIM_RULES",
            "",
        ]
    )


# Bash; string.Template's ${name} marks the only substitutions, every shell variable is $name.
_BOOT_SCRIPT = string.Template(
    """\
#!/bin/bash
# Every boot: forwarding and the filter, source/dest check off, the stable interface attached and
# configured, then the verdict to Auto Scaling and CloudFormation. Anything failing marks the NAT
# unhealthy (the group replaces it) and abandons its launch.
set -euo pipefail
. ${env_file}
export AWS_DEFAULT_REGION="$$REGION" AWS_RETRY_MODE=standard AWS_MAX_ATTEMPTS=8
echo 1 > /proc/sys/net/ipv4/ip_forward

retry() {
  local attempt=1
  until "$$@"; do
    if [ "$$attempt" -ge 6 ]; then return 1; fi
    sleep $$((attempt * attempt * 2))
    attempt=$$((attempt + 1))
  done
}
imds() {
  local token
  token="$$(curl -sSf -m 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' \\
    http://169.254.169.254/latest/api/token)"
  curl -sSf -m 5 -H "X-aws-ec2-metadata-token: $$token" "http://169.254.169.254/latest/meta-data/$$1"
}
verdict() {
  # Outside a launch there is no action to complete, outside a deployment no signal to send: both
  # calls then fail, which is the expected answer.
  aws autoscaling complete-lifecycle-action --auto-scaling-group-name "$$GROUP" \\
    --lifecycle-hook-name "$$HOOK" --instance-id "$$instance" --lifecycle-action-result "$$1" || true
  aws cloudformation signal-resource --stack-name "$$STACK" --logical-resource-id "$$RESOURCE" \\
    --unique-id "$$instance" --status "$$2" || true
}
failed() {
  echo "eip-reclaim-nat: setup failed; this NAT must not serve" >&2
  aws autoscaling set-instance-health --instance-id "$$instance" --health-status Unhealthy || true
  verdict ABANDON FAILURE
}

instance="$$(retry imds instance-id)"
trap failed ERR

if ! command -v iptables-restore >/dev/null; then
  retry dnf install -y iptables-nft
fi
sh ${network_script}
# Replies to forwarded traffic leave the primary interface with the destination's source address: its
# source/dest check goes off, by the interface's id (with the stable interface attached, as at every
# boot after the first, EC2 refuses the instance-wide call). Already off: no call.
mac="$$(retry imds mac)"
primary="$$(retry imds "network/interfaces/macs/$$mac/interface-id")"
checked="$$(retry aws ec2 describe-network-interfaces --network-interface-ids "$$primary" \\
  --query 'NetworkInterfaces[0].SourceDestCheck' --output text)"
if [ "$$checked" != "False" ]; then
  retry aws ec2 modify-network-interface-attribute --network-interface-id "$$primary" --no-source-dest-check
fi

attached="$$(retry aws ec2 describe-network-interfaces --network-interface-ids "$$ENI" \\
  --query 'NetworkInterfaces[0].Attachment.[InstanceId,AttachmentId]' --output text)"
holder="$${attached%%[[:space:]]*}"
if [ "$$holder" != "$$instance" ]; then
  if [ "$$holder" != "None" ]; then
    # The NAT being replaced still holds it: the interface moves now, not when that one is gone.
    retry aws ec2 detach-network-interface --attachment-id "$${attached##*[[:space:]]}" --force
    retry aws ec2 wait network-interface-available --network-interface-ids "$$ENI"
  fi
  retry aws ec2 attach-network-interface --network-interface-id "$$ENI" --instance-id "$$instance" \\
    --device-index ${device_index}
fi

# Ready only once the OS has the stable address up on the attached interface.
for _ in $$(seq 1 60); do
  if ip -4 -o addr show | grep -q " inet $$ADDRESS/"; then break; fi
  sleep 2
done
ip -4 -o addr show | grep -q " inet $$ADDRESS/"
sh ${network_script}
trap - ERR
verdict CONTINUE SUCCESS
echo "eip-reclaim-nat: forwarding for the VPC at $$ADDRESS"
"""
)


def nat_boot_script(*, env_file: str = ENV_FILE, network_script: str = NETWORK_SCRIPT) -> str:
    """The boot unit's script (bash); the paths are parameters only so that a test can run it elsewhere."""
    return _BOOT_SCRIPT.substitute(
        env_file=env_file, network_script=network_script, device_index=STABLE_DEVICE_INDEX
    )


_UNIT = f"""\
[Unit]
Description=eip-reclaim NAT: forwarding, packet filter and the stable interface, at every boot
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={BOOT_SCRIPT}
TimeoutStartSec=600

[Install]
WantedBy=multi-user.target
"""


def nat_commands(
    *,
    vpc_cidr: str,
    interface_id: str,
    address: str,
    group_name: str,
    stack_name: str,
    resource: str,
) -> list[str]:
    """User data: first boot installs the scripts and the unit; the unit does the work, at every boot."""
    env = "\n".join(
        [
            f"REGION={Aws.REGION}",
            f"ENI={interface_id}",
            f"ADDRESS={address}",
            f"GROUP={group_name}",
            f"HOOK={LIFECYCLE_HOOK_NAME}",
            f"STACK={stack_name}",
            f"RESOURCE={resource}",
        ]
    )
    boot = nat_boot_script()
    return [
        "set -euo pipefail",
        "mkdir -p /etc/eip-reclaim",
        f"cat > {ENV_FILE} <<'EIP_RECLAIM_ENV'",
        env,
        "EIP_RECLAIM_ENV",
        f"cat > {NETWORK_SCRIPT} <<'EIP_RECLAIM_NETWORK'",
        nat_network_setup(vpc_cidr).rstrip("\n"),
        "EIP_RECLAIM_NETWORK",
        f"cat > {BOOT_SCRIPT} <<'EIP_RECLAIM_BOOT'",
        boot.rstrip("\n"),
        "EIP_RECLAIM_BOOT",
        f"chmod 0755 {BOOT_SCRIPT} {NETWORK_SCRIPT}",
        f"cat > /etc/systemd/system/{BOOT_UNIT} <<'EIP_RECLAIM_UNIT'",
        _UNIT.rstrip("\n"),
        "EIP_RECLAIM_UNIT",
        "systemctl daemon-reload",
        f"systemctl enable --now {BOOT_UNIT}",
    ]


class NatInstance(Construct):
    """One AZ's NAT: a stable interface at a fixed address, and a group of one instance that takes it."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        vpc: ec2.IVpc,
        subnet: ec2.ISubnet,
        vpc_cidr: str,
        instance_type: str,
        arm64: bool,
        security_group: ec2.ISecurityGroup,
        group_name: str,
        topic: sns.ITopic | None,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.private_ip = nat_address(subnet.ipv4_cidr_block)
        self.subnet = subnet
        self.group_name = group_name
        # The address lives here, not on an instance: CloudFormation can replace NAT instances (create
        # the new one before deleting the old) because none of them owns the address.
        self.interface = ec2.CfnNetworkInterface(
            self,
            "Interface",
            subnet_id=subnet.subnet_id,
            private_ip_address=self.private_ip,
            group_set=[security_group.security_group_id],
            source_dest_check=False,
            description=f"eip-reclaim NAT at {self.private_ip}: outlives the NAT instances that use it",
        )
        self.interface_arn = stack.format_arn(
            service="ec2", resource="network-interface", resource_name=self.interface.ref
        )
        group_arn = stack.format_arn(
            service="autoscaling",
            resource="autoScalingGroup",
            resource_name=f"*:autoScalingGroupName/{group_name}",
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        subnet_arn = stack.format_arn(service="ec2", resource="subnet", resource_name=subnet.subnet_id)
        own_instances = {"StringEquals": {"aws:ResourceTag/aws:autoscaling:groupName": group_name}}
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description=f"NAT at {self.private_ip}: take its interface, report ready; Session Manager",
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")],
            inline_policies={
                "Nat": iam.PolicyDocument(
                    statements=[
                        iam.PolicyStatement(
                            sid="FindTheInterface",
                            # No resource type: "*" is the only resource it accepts. It reads.
                            actions=["ec2:DescribeNetworkInterfaces"],
                            resources=["*"],
                        ),
                        iam.PolicyStatement(
                            sid="MoveOnlyThisInterface",
                            actions=["ec2:AttachNetworkInterface", "ec2:DetachNetworkInterface"],
                            resources=[self.interface_arn],
                        ),
                        iam.PolicyStatement(
                            sid="SourceDestCheckInItsSubnet",
                            # The primary interface's id is known only at boot: interfaces of this NAT's
                            # subnet, and (statement below) only while attached to this group's instances.
                            # EC2 offers no condition key that names the attribute changed.
                            actions=["ec2:ModifyNetworkInterfaceAttribute"],
                            resources=[
                                stack.format_arn(
                                    service="ec2", resource="network-interface", resource_name="*"
                                )
                            ],
                            conditions={"ArnEquals": {"ec2:Subnet": subnet_arn}},
                        ),
                        iam.PolicyStatement(
                            sid="OnlyBetweenThisGroupsInstances",
                            # The reserved tag only Auto Scaling sets: no one can tag their way in.
                            actions=[
                                "ec2:AttachNetworkInterface",
                                "ec2:DetachNetworkInterface",
                                "ec2:ModifyNetworkInterfaceAttribute",
                            ],
                            resources=[
                                stack.format_arn(service="ec2", resource="instance", resource_name="*")
                            ],
                            conditions=own_instances,
                        ),
                        iam.PolicyStatement(
                            sid="ReportReadiness",
                            actions=["autoscaling:CompleteLifecycleAction", "autoscaling:SetInstanceHealth"],
                            resources=[group_arn],
                        ),
                    ]
                )
            },
        )
        arch = "arm64" if arm64 else "x86_64"
        self.user_data = ec2.UserData.for_linux()
        self.launch_template = ec2.LaunchTemplate(
            self,
            "LaunchTemplate",
            instance_type=ec2.InstanceType(instance_type),
            machine_image=ec2.MachineImage.resolve_ssm_parameter_at_launch(
                AL2023_PARAMETER.format(arch=arch), os=ec2.OperatingSystemType.LINUX
            ),
            # The NAT's own egress (and its calls to the EC2 API at boot) need a public address.
            associate_public_ip_address=True,
            security_group=security_group,
            role=self.role,
            user_data=self.user_data,
            # IMDSv2 only, one hop: nothing the NAT forwards can ever read its metadata.
            http_endpoint=True,
            http_tokens=ec2.LaunchTemplateHttpTokens.REQUIRED,
            http_put_response_hop_limit=1,
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/xvda",
                    volume=ec2.BlockDeviceVolume.ebs(
                        8, encrypted=True, volume_type=ec2.EbsDeviceVolumeType.GP3, delete_on_termination=True
                    ),
                )
            ],
        )
        self.group = autoscaling.AutoScalingGroup(
            self,
            "Group",
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnets=[subnet]),
            launch_template=self.launch_template,
            min_capacity=1,
            max_capacity=1,
            desired_capacity=1,
            # Named: the role and the user data name the group, and a generated name would make the group
            # depend on its own launch template's user data.
            auto_scaling_group_name=group_name,
            # A NAT that fails its status checks is replaced; the new one takes the interface.
            health_checks=autoscaling.HealthChecks.ec2(grace_period=NAT_READY_TIMEOUT),
            group_metrics=[autoscaling.GroupMetrics(autoscaling.GroupMetric.IN_SERVICE_INSTANCES)],
            # A create or update waits for the NAT to say it forwards at its address, and fails otherwise
            # (CDK grants the role cloudformation:SignalResource on exactly this stack's id).
            signals=autoscaling.Signals.wait_for_count(1, timeout=NAT_READY_TIMEOUT),
            # One NAT per AZ: the old one goes first, the new one takes the interface as it boots (it
            # would take it from a survivor too). The detour is down for one NAT boot in that AZ only.
            update_policy=autoscaling.UpdatePolicy.rolling_update(
                max_batch_size=1, min_instances_in_service=0
            ),
        )
        hold_launches(
            self.group, name=LIFECYCLE_HOOK_NAME, timeout_seconds=int(NAT_READY_TIMEOUT.to_seconds())
        )
        cfn_group = self.group.node.default_child
        assert isinstance(cfn_group, autoscaling.CfnAutoScalingGroup)
        # The script names the group's logical ID, known only now; the template renders it lazily.
        self.user_data.add_commands(
            *nat_commands(
                vpc_cidr=vpc_cidr,
                interface_id=self.interface.ref,
                address=self.private_ip,
                group_name=group_name,
                stack_name=Aws.STACK_NAME,
                resource=stack.get_logical_id(cfn_group),
            )
        )
        cfn_template = self.launch_template.node.default_child
        assert isinstance(cfn_template, ec2.CfnLaunchTemplate)
        # cfn-lint knows only "ami-..." here; the reason is the launch-time resolution described above.
        cfn_template.add_metadata("cfn-lint", {"config": {"ignore_checks": ["E1152"]}})
        cfn_template.add_metadata("checkov", {"skip": [{"id": "CKV_AWS_88", "comment": CHECKOV_PUBLIC_IP}]})
        self.status_alarm = self._status_alarm(topic)
        self.in_service_alarm = in_service_alarm(
            self,
            "NoInstanceInService",
            group_name=group_name,
            what=f"the NAT at {self.private_ip}",
            topic=topic,
        )

    def _status_alarm(self, topic: sns.ITopic | None) -> cloudwatch.Alarm:
        alarm = cloudwatch.Metric(
            namespace="AWS/EC2",
            metric_name="StatusCheckFailed",
            dimensions_map={"AutoScalingGroupName": self.group_name},
            statistic="Maximum",
            period=Duration.minutes(1),
        ).create_alarm(
            self,
            "StatusCheckAlarm",
            evaluation_periods=_STATUS_CHECK_PERIODS,
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.MISSING,
            alarm_description=(
                f"The NAT at {self.private_ip} fails its status checks; its group replaces it "
                "(README: runbook)"
            ),
        )
        if topic is not None:
            alarm.add_alarm_action(cloudwatch_actions.SnsAction(topic))
        return alarm


def in_service_alarm(
    scope: Construct, construct_id: str, *, group_name: str, what: str, topic: sns.ITopic | None
) -> cloudwatch.Alarm:
    """An alarm when a group of one has had no in-service instance for five minutes (group metrics on)."""
    alarm = cloudwatch.Metric(
        namespace="AWS/AutoScaling",
        metric_name="GroupInServiceInstances",
        dimensions_map={"AutoScalingGroupName": group_name},
        statistic="Maximum",
        period=Duration.minutes(1),
    ).create_alarm(
        scope,
        construct_id,
        # A heal takes a boot and a claim (about two minutes); five minutes without one is not a heal.
        evaluation_periods=5,
        threshold=1,
        comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
        # The group reports 0 when it has none. No data means no group yet (a first deploy, before its
        # metrics start): keep the state rather than page about a group that is still being created.
        treat_missing_data=cloudwatch.TreatMissingData.MISSING,
        alarm_description=f"No in-service instance for {what} for 5 minutes (README: runbook)",
    )
    if topic is not None:
        alarm.add_alarm_action(cloudwatch_actions.SnsAction(topic))
    return alarm


class StableNatProvider(ec2.NatProvider):
    """Gives a VPC one `NatInstance` per AZ and routes the private subnets to its stable interface.

    The VPC calls `configure_nat` once with its public and private subnets; `instances` then holds
    one NAT per public subnet. Every argument has a default: ``ec2.Vpc(...,
    nat_gateway_provider=StableNatProvider())`` gives t4g.nano NATs that admit the VPC's own block,
    in groups named after the stack, with alarms but no alarm action unless `topic` is given.
    """

    def __init__(
        self,
        *,
        instance_type: str = DEFAULT_INSTANCE_TYPE,
        vpc_cidr: str | None = None,
        arm64: bool | None = None,
        group_prefix: str | None = None,
        topic: sns.ITopic | None = None,
    ) -> None:
        super().__init__()
        # None: the VPC's own block (a CloudFormation reference), the image's CPU from the instance
        # type, and the stack's name (one provider per stack; the group names must be unique).
        self._vpc_cidr = vpc_cidr
        self._instance_type = instance_type
        self._arm64 = arm64 if arm64 is not None else is_graviton(instance_type)
        self._group_prefix = group_prefix
        self._topic = topic
        self.instances: list[NatInstance] = []
        self.security_group: ec2.SecurityGroup | None = None

    def configure_nat(
        self,
        *,
        nat_subnets: Sequence[ec2.PublicSubnet],
        private_subnets: Sequence[ec2.PrivateSubnet],
        vpc: ec2.Vpc,
    ) -> None:
        self.add_nats(vpc, vpc=vpc, nat_subnets=nat_subnets, under_subnets=True)
        for private in private_subnets:
            self.configure_subnet(private)

    def add_nats(
        self,
        scope: Construct,
        *,
        vpc: ec2.IVpc,
        nat_subnets: Sequence[ec2.ISubnet],
        under_subnets: bool = False,
    ) -> None:
        """One NAT per subnet (one per AZ) and their security group, under `scope`; no route is added.

        `under_subnets` puts each NAT under its subnet's construct instead (a VPC the app creates: the
        logical IDs the deployed NATs have always had); a team's own subnets are references, not scopes.
        """
        vpc_cidr = self._vpc_cidr if self._vpc_cidr is not None else vpc.vpc_cidr_block
        group_prefix = self._group_prefix if self._group_prefix is not None else Stack.of(scope).stack_name
        self.security_group = ec2.SecurityGroup(
            scope,
            "NatSecurityGroup",
            vpc=vpc,
            description="NAT instances: admit only the VPC own addresses",
            allow_all_outbound=True,
        )
        self.security_group.add_ingress_rule(
            ec2.Peer.ipv4(vpc_cidr), ec2.Port.all_traffic(), "forwarded traffic from inside the VPC"
        )
        if Token.is_unresolved(vpc_cidr):
            nag.acknowledge_vpc_block_ingress(self.security_group)
        for index, subnet in enumerate(nat_subnets):
            nat_scope, nat_id = (subnet, "Nat") if under_subnets else (scope, f"Nat{index + 1}")
            self.instances.append(
                NatInstance(
                    nat_scope,  # type: ignore[arg-type]  # a PublicSubnet is a Construct
                    nat_id,
                    vpc=vpc,
                    subnet=subnet,
                    vpc_cidr=vpc_cidr,
                    instance_type=self._instance_type,
                    arm64=self._arm64,
                    security_group=self.security_group,
                    group_name=f"{group_prefix}-nat{index + 1}",
                    topic=self._topic,
                )
            )
        # Each NAT carries its own cdk-nag acknowledgements, in the app's VPC or a team's.
        nag.acknowledge_nats(self.instances)

    def configure_subnet(self, subnet: ec2.PrivateSubnet) -> None:
        nat = self._in_az(subnet.availability_zone)
        subnet.add_route(
            "DefaultRoute",
            router_id=nat.interface.ref,
            router_type=ec2.RouterType.NETWORK_INTERFACE,
            destination_cidr_block="0.0.0.0/0",
            enables_internet_connectivity=True,
        )

    @property
    def configured_gateways(self) -> list[ec2.GatewayConfig]:
        return [
            ec2.GatewayConfig(az=nat.subnet.availability_zone, gateway_id=nat.interface.ref)
            for nat in self.instances
        ]

    def _in_az(self, az: Any) -> NatInstance:
        for nat in self.instances:
            if nat.subnet.availability_zone == az:
                return nat
        raise LookupError(f"no NAT instance in availability zone {az}")
