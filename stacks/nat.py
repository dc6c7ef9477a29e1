"""NAT instances at stable addresses: the detour a booting instance takes to reach the EC2 API."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from constructs import Construct

# AWS reserves the first four addresses of every subnet (network, router, DNS, future use): the fifth
# is the first an instance can hold, and it depends only on the subnet's CIDR, so a NAT instance that
# is recovered or rebuilt comes back at the same address and the maps in user data never go stale.
NAT_HOST_OFFSET = 4

# Link-local is where every instance's IMDS, DNS resolver and time server live. A NAT that forwarded
# it would answer a detoured instance with the NAT's own metadata: the bug this product guards against.
LINK_LOCAL = "169.254.0.0/16"

# Amazon Linux 2023, resolved by EC2 when the instance launches: the template never changes, so a new
# AMI release never makes CloudFormation replace a NAT instance (a replacement would need the NAT's
# fixed address while the old instance still holds it).
AL2023_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"

# Status checks report once a minute; three failed minutes in a row is a host or OS that will not heal
# by itself, not a blip.
_STATUS_CHECK_PERIODS = 3


def nat_address(subnet_cidr: str) -> str:
    """The private IPv4 address of the NAT instance in a public subnet with this CIDR."""
    network = ipaddress.IPv4Network(subnet_cidr)
    return str(network.network_address + NAT_HOST_OFFSET)


def iptables_rules(vpc_cidr: str) -> str:
    """The NAT's packet filter, in iptables-restore format (the VPC lab applies the same text)."""
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


def nat_user_data(vpc_cidr: str) -> ec2.UserData:
    """First-boot script: persistent forwarding and the packet filter, both survive reboot and recovery."""
    user_data = ec2.UserData.for_linux()
    user_data.add_commands(
        "set -euo pipefail",
        # AL2023 ships without iptables; the NAT reaches the package mirrors through its public IPv4.
        "dnf install -y iptables-services",
        "cat > /etc/sysctl.d/90-eip-reclaim-nat.conf <<'EOF'",
        "net.ipv4.ip_forward = 1",
        "EOF",
        "sysctl --system",
        "cat > /etc/sysconfig/iptables <<'EOF'",
        iptables_rules(vpc_cidr).rstrip("\n"),
        "EOF",
        "systemctl enable --now iptables",
    )
    return user_data


class NatInstance(Construct):
    """One NAT instance at a fixed address in a public subnet, recovered in place when its host fails."""

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
    ) -> None:
        super().__init__(scope, construct_id)
        self.private_ip = nat_address(subnet.ipv4_cidr_block)
        self.subnet = subnet
        arch = "arm64" if arm64 else "x86_64"
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="NAT instance: Session Manager access for operators, nothing else",
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")],
        )
        self.instance = ec2.Instance(
            self,
            "Instance",
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnets=[subnet]),
            instance_type=ec2.InstanceType(instance_type),
            machine_image=ec2.MachineImage.resolve_ssm_parameter_at_launch(
                AL2023_PARAMETER.format(arch=arch), os=ec2.OperatingSystemType.LINUX
            ),
            private_ip_address=self.private_ip,
            # The NAT's own egress needs a public address; the public subnets give none by default.
            associate_public_ip_address=True,
            source_dest_check=False,
            # IMDSv2 only, one hop: nothing the NAT forwards can ever read its metadata.
            http_endpoint=True,
            http_tokens=ec2.HttpTokens.REQUIRED,
            http_put_response_hop_limit=1,
            security_group=security_group,
            role=self.role,
            user_data=nat_user_data(vpc_cidr),
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/xvda",
                    volume=ec2.BlockDeviceVolume.ebs(
                        8, encrypted=True, volume_type=ec2.EbsDeviceVolumeType.GP3, delete_on_termination=True
                    ),
                )
            ],
        )
        # cfn-lint knows only "ami-..." here; the reason is the launch-time resolution described above.
        self.instance.instance.add_metadata("cfn-lint", {"config": {"ignore_checks": ["E1152"]}})
        # Host failure: EC2 moves the same instance (same id, ENI, private and public IPv4) to new hardware.
        self.recover_alarm = self._status_alarm(
            "SystemCheckAlarm", "StatusCheckFailed_System", cloudwatch_actions.Ec2InstanceAction.RECOVER
        )
        # OS failure (kernel panic, lost network): a reboot keeps the instance and its address.
        self.reboot_alarm = self._status_alarm(
            "InstanceCheckAlarm", "StatusCheckFailed_Instance", cloudwatch_actions.Ec2InstanceAction.REBOOT
        )

    def _status_alarm(
        self, construct_id: str, metric_name: str, action: cloudwatch_actions.Ec2InstanceAction
    ) -> cloudwatch.Alarm:
        alarm = cloudwatch.Metric(
            namespace="AWS/EC2",
            metric_name=metric_name,
            dimensions_map={"InstanceId": self.instance.instance_id},
            statistic="Maximum",
            period=Duration.minutes(1),
        ).create_alarm(
            self,
            construct_id,
            evaluation_periods=_STATUS_CHECK_PERIODS,
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.MISSING,
            alarm_description=f"{metric_name} on the NAT instance at {self.private_ip}",
        )
        alarm.add_alarm_action(cloudwatch_actions.Ec2Action(action))
        return alarm


class StableNatProvider(ec2.NatProvider):
    """Gives a VPC one `NatInstance` per AZ at its stable address and routes the private subnets to it.

    The VPC calls `configure_nat` once with its public and private subnets; `instances` then holds
    one NAT per public subnet.
    """

    def __init__(self, *, vpc_cidr: str, instance_type: str, arm64: bool) -> None:
        super().__init__()
        self._vpc_cidr = vpc_cidr
        self._instance_type = instance_type
        self._arm64 = arm64
        self.instances: list[NatInstance] = []
        self.security_group: ec2.SecurityGroup | None = None

    def configure_nat(
        self,
        *,
        nat_subnets: Sequence[ec2.PublicSubnet],
        private_subnets: Sequence[ec2.PrivateSubnet],
        vpc: ec2.Vpc,
    ) -> None:
        self.security_group = ec2.SecurityGroup(
            vpc,
            "NatSecurityGroup",
            vpc=vpc,
            description="NAT instances: admit only the VPC own addresses",
            allow_all_outbound=True,
        )
        self.security_group.add_ingress_rule(
            ec2.Peer.ipv4(self._vpc_cidr), ec2.Port.all_traffic(), "forwarded traffic from inside the VPC"
        )
        for subnet in nat_subnets:
            self.instances.append(
                NatInstance(
                    subnet,
                    "Nat",
                    vpc=vpc,
                    subnet=subnet,
                    vpc_cidr=self._vpc_cidr,
                    instance_type=self._instance_type,
                    arm64=self._arm64,
                    security_group=self.security_group,
                )
            )
        for private in private_subnets:
            self.configure_subnet(private)

    def configure_subnet(self, subnet: ec2.PrivateSubnet) -> None:
        nat = self._in_az(subnet.availability_zone)
        subnet.add_route(
            "DefaultRoute",
            router_id=nat.instance.instance_id,
            router_type=ec2.RouterType.INSTANCE,
            destination_cidr_block="0.0.0.0/0",
            enables_internet_connectivity=True,
        )

    @property
    def configured_gateways(self) -> list[ec2.GatewayConfig]:
        return [
            ec2.GatewayConfig(az=nat.subnet.availability_zone, gateway_id=nat.instance.instance_id)
            for nat in self.instances
        ]

    def _in_az(self, az: Any) -> NatInstance:
        for nat in self.instances:
            if nat.subnet.availability_zone == az:
                return nat
        raise LookupError(f"no NAT instance in availability zone {az}")
