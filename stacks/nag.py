"""Every finding this app accepts (cdk-nag AwsSolutions, CDK's own checks), narrowly, with its reason."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aws_cdk import Acknowledgment, Validations
from constructs import IConstruct

if TYPE_CHECKING:
    from stacks.healing_service import HealingServiceStack
    from stacks.network import NetworkStack

# The one AWS managed policy the app attaches, as cdk-nag names it in a finding.
SSM_CORE = "Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore"
_ARN_PREFIX = "arn:<AWS::Partition>"


def acknowledge(network: NetworkStack, services: Sequence[HealingServiceStack]) -> None:
    """Attach each acknowledgement to the narrowest construct it concerns."""
    for nat in network.network.nat_instances:
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
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{_ARN_PREFIX}:ec2:<AWS::Region>:<AWS::AccountId>:instance/*]",
            "Attach/detach and the source/dest check only on instances whose reserved "
            f"aws:autoscaling:groupName tag is {nat.group_name}, which only Auto Scaling can set.",
        )
        _ack(
            nat.role,
            "AwsSolutions::AwsSolutions-IAM5[Resource::"
            f"{_ARN_PREFIX}:autoscaling:<AWS::Region>:<AWS::AccountId>:autoScalingGroup:*:"
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

    for stack in services:
        group = stack.healing_group
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
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{_ARN_PREFIX}:ec2:<AWS::Region>:<AWS::AccountId>:instance/*]",
            f"ec2:AssociateAddress on instances is limited by a condition to those whose reserved "
            f"aws:autoscaling:groupName tag is {group.group_name}, which only Auto Scaling can set.",
        )
        _ack(
            group.role,
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{_ARN_PREFIX}:ec2:<AWS::Region>:<AWS::AccountId>:"
            "network-interface/*]",
            "ec2:AssociateAddress may be authorized on the instance's interface too; limited by the "
            "ec2:Vpc condition to this VPC, and the Elastic IP's own ARN limits what can be taken.",
        )
        _ack(
            group.role,
            "AwsSolutions::AwsSolutions-IAM5[Resource::"
            f"{_ARN_PREFIX}:autoscaling:<AWS::Region>:<AWS::AccountId>:autoScalingGroup:*:"
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
        if stack.service.spot is not None:
            _ack(
                group.group,
                "AwsSolutions::AwsSolutions-EC26",
                "The rule reads a launch template named at the group's top level and fails on one named "
                "in a mixed instances policy; that template's only volume is encrypted gp3 (unit tests).",
            )
        if stack.service.warm_pool:
            _ack(
                group.group,
                "Annotation::@aws-cdk/aws-autoscaling:signalsNotUsedByInstanceRefresh",
                "The signal serves the stack's creation only; a deploy's instance refresh waits for the "
                "launch hook (the payload's CONTINUE after its claim) and fails on the Abandoned alarm.",
            )
        if stack.service.ingress_cidr == "0.0.0.0/0":
            _ack(
                group.security_group,
                "AwsSolutions::AwsSolutions-EC23",
                f"A public service at a fixed address: only its configured TCP ports "
                f"{list(stack.service.ingress_ports)} are open to the internet.",
            )


def _ack(scope: IConstruct, rule: str, reason: str) -> None:
    Validations.of(scope).acknowledge(Acknowledgment(id=rule, reason=reason))
