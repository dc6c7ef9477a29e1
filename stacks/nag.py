"""Every finding this app accepts (cdk-nag AwsSolutions, CDK's own checks), narrowly, with its reason."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aws_cdk import Acknowledgment, Stack, Token, Validations
from constructs import IConstruct

if TYPE_CHECKING:
    from .config import ServiceConfig
    from .healing_service import HealingGroup, HealingServiceStack
    from .nat import NatInstance
    from .network import NetworkStack

# The one AWS managed policy the app attaches, as cdk-nag names it in a finding (its ARN names the
# partition by the pseudo parameter whatever the stack's environment).
SSM_CORE = "Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore"


def acknowledge(network: NetworkStack, services: Sequence[HealingServiceStack]) -> None:
    """Attach each acknowledgement to the narrowest construct it concerns.

    The network's NATs acknowledge their own as `StableNatProvider` adds them (`acknowledge_nats`).
    """
    for stack in services:
        acknowledge_service(stack.healing_group, stack.service)


def acknowledge_nats(nats: Sequence[NatInstance]) -> None:
    """The findings of NAT instances, wherever they are (the app's network or a team's own VPC)."""
    for nat in nats:
        _ack(
            nat.role,
            f"AwsSolutions::AwsSolutions-IAM4[{SSM_CORE}]",
            "Session Manager is the operators' only way onto a NAT instance (no SSH keys, no port 22); "
            "AWS maintains this policy as the SSM agent's needs change.",
        )
        _ack(
            nat.role,
            "AwsSolutions::AwsSolutions-IAM5[Resource::*]",
            "ec2:DescribeNetworkInterfaces has no resource type and accepts only '*'; it reads.",
        )
        _ack(
            nat.role,
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{_arn(nat.role, 'ec2')}:instance/*]",
            "Attach/detach and the source/dest check only on instances whose reserved "
            f"aws:autoscaling:groupName tag is {nat.group_name}, which only Auto Scaling can set.",
        )
        _ack(
            nat.role,
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{_arn(nat.role, 'ec2')}:network-interface/*]",
            "The primary interface's source/dest check: its id is known only at boot; limited by the "
            "ec2:Subnet condition to interfaces of this NAT's subnet.",
        )
        _ack(
            nat.role,
            "AwsSolutions::AwsSolutions-IAM5[Resource::"
            f"{_arn(nat.role, 'autoscaling')}:autoScalingGroup:*:"
            f"autoScalingGroupName/{nat.group_name}]",
            "The '*' is the group's id, unknown before it exists; the ARN names this one NAT group.",
        )
        _ack(
            nat.group,
            "AwsSolutions::AwsSolutions-AS3",
            "Failed launches reach the app's alert topic through an EventBridge rule, and a NAT "
            "without an in-service instance raises an alarm; per-instance notifications add noise.",
        )
        _ack(
            nat.group,
            "Annotation::@aws-cdk/aws-autoscaling:desiredCapacitySet",
            "Minimum = maximum = desired = 1 by design: one NAT per AZ, set back to 1 by every deploy.",
        )
        _ack(
            nat.launch_template,
            "CloudFormation-Validate::E1152",
            "ImageId 'resolve:ssm:...' is EC2's launch-time resolution of the Amazon Linux 2023 "
            "parameter: every NAT the group launches boots the current image without a deploy.",
        )


def acknowledge_vpc_block_ingress(security_group: IConstruct) -> None:
    """A NAT security group whose one ingress rule names the VPC's block by reference (a VPC made in
    the same app): cdk-nag cannot read the CIDR at synth and reports its rule as failed to evaluate."""
    _ack(
        security_group,
        "AwsSolutions::AwsSolutions-EC23",
        "The NATs admit only the VPC's own IPv4 block; it is a CloudFormation reference to the VPC "
        "(Fn::GetAtt CidrBlock), which the rule cannot evaluate at synth.",
    )


def acknowledge_service(group: HealingGroup, service: ServiceConfig) -> None:
    """The findings of one healing service's group, role and security group."""
    _ack(
        group.role,
        f"AwsSolutions::AwsSolutions-IAM4[{SSM_CORE}]",
        "Session Manager is the operators' only way onto the instance (no SSH keys, no port 22).",
    )
    _ack(
        group.role,
        "AwsSolutions::AwsSolutions-IAM5[Resource::*]",
        "ec2:DescribeAddresses and ec2:DescribeInstances have no resource type and accept only '*' "
        "(they read, never change); cloudwatch:PutMetricData has none either and is limited by its "
        "namespace condition to EipReclaim.",
    )
    _ack(
        group.role,
        f"AwsSolutions::AwsSolutions-IAM5[Resource::{_arn(group.role, 'ec2')}:instance/*]",
        f"ec2:AssociateAddress on instances is limited by a condition to those whose reserved "
        f"aws:autoscaling:groupName tag is {group.group_name}, which only Auto Scaling can set.",
    )
    _ack(
        group.role,
        f"AwsSolutions::AwsSolutions-IAM5[Resource::{_arn(group.role, 'ec2')}:network-interface/*]",
        "ec2:AssociateAddress may be authorized on the instance's interface too; limited by the "
        "ec2:Vpc condition to this VPC, and the Elastic IP's own ARN limits what can be taken.",
    )
    _ack(
        group.role,
        "AwsSolutions::AwsSolutions-IAM5[Resource::"
        f"{_arn(group.role, 'autoscaling')}:autoScalingGroup:*:"
        f"autoScalingGroupName/{group.group_name}]",
        "The '*' is the group's id, unknown before it exists; the ARN names this one group "
        "(CompleteLifecycleAction, and SetInstanceHealth for the watchdog's report on its own instance).",
    )
    _ack(
        group.group,
        "AwsSolutions::AwsSolutions-AS3",
        "Failed launches reach the app's alert topic through an EventBridge rule, abandoned ones "
        "through the payload's Abandoned metric and its alarm; per-instance notifications add noise.",
    )
    _ack(
        group.group,
        "Annotation::@aws-cdk/aws-autoscaling:desiredCapacitySet",
        "Minimum = desired = 1 by design (maximum 1, or 2 with handover launch-first for the "
        "minutes of a handover): every deploy setting the size back to 1 is intended.",
    )
    if service.spot is not None:
        _ack(
            group.group,
            "AwsSolutions::AwsSolutions-EC26",
            "The rule reads a launch template named at the group's top level and fails on one named "
            "in a mixed instances policy; that template's only volume is encrypted gp3 (unit tests).",
        )
    if service.warm_pool:
        _ack(
            group.group,
            "Annotation::@aws-cdk/aws-autoscaling:signalsNotUsedByInstanceRefresh",
            "The signal serves the stack's creation only; a deploy's instance refresh waits for the "
            "launch hook (the payload's CONTINUE after its claim) and fails on the Abandoned alarm.",
        )
    if service.ingress_cidr == "0.0.0.0/0":
        _ack(
            group.security_group,
            "AwsSolutions::AwsSolutions-EC23",
            f"A public service at a fixed address: only its configured TCP ports "
            f"{list(service.ingress_ports)} are open to the internet.",
        )


def _arn(scope: IConstruct, service: str) -> str:
    """The head of an ARN in the scope's stack as cdk-nag prints it in a finding: the partition, region
    and account as pseudo parameters (<AWS::Region>) in an environment-agnostic stack, as literals in a
    stack bound to an account and region (a pipeline's stages)."""
    stack = Stack.of(scope)
    return f"arn:{_shown(stack.partition, 'Partition')}:{service}:{_shown(stack.region, 'Region')}:" + (
        _shown(stack.account, "AccountId")
    )


def _shown(value: str, pseudo: str) -> str:
    return f"<AWS::{pseudo}>" if Token.is_unresolved(value) else value


def _ack(scope: IConstruct, rule: str, reason: str) -> None:
    Validations.of(scope).acknowledge(Acknowledgment(id=rule, reason=reason))
