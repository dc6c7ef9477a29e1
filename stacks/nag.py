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
            nat.instance,
            "AwsSolutions::AwsSolutions-EC28",
            "The recovery alarms use the status-check metrics, which EC2 reports every minute without "
            "detailed monitoring; detailed monitoring would add cost and no signal the NAT needs.",
        )
        _ack(
            nat.instance,
            "AwsSolutions::AwsSolutions-EC29",
            "Termination protection would stop CloudFormation from deleting or replacing the NAT; "
            "it is recovered in place by its status-check alarms instead of by an Auto Scaling group.",
        )
        _ack(
            nat.instance,
            "CloudFormation-Validate::E1152",
            "ImageId 'resolve:ssm:...' is EC2's launch-time resolution of the Amazon Linux 2023 "
            "parameter: the template never changes with a new AMI, so the NAT at its fixed address "
            "is never replaced (which would fail while the old instance holds the address).",
        )

    for stack in services:
        group = stack.healing_group
        name = stack.service.name
        _ack(
            group.role,
            f"AwsSolutions::AwsSolutions-IAM4[{SSM_CORE}]",
            "Session Manager is the operators' only way onto the instance (no SSH keys, no port 22).",
        )
        _ack(
            group.role,
            "AwsSolutions::AwsSolutions-IAM5[Resource::*]",
            "ec2:DescribeAddresses and ec2:DescribeInstances have no resource type and accept only '*'; "
            "they read, never change.",
        )
        _ack(
            group.role,
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{_ARN_PREFIX}:ec2:<AWS::Region>:<AWS::AccountId>:instance/*]",
            f"ec2:AssociateAddress on instances is limited by a condition to those tagged "
            f"eip-reclaim:service={name}, which only this service's group launches.",
        )
        _ack(
            group.role,
            "AwsSolutions::AwsSolutions-IAM5[Resource::"
            f"{_ARN_PREFIX}:autoscaling:<AWS::Region>:<AWS::AccountId>:autoScalingGroup:*:"
            f"autoScalingGroupName/{group.group_name}]",
            "The '*' is the group's id, unknown before it exists; the ARN names this one group.",
        )
        _ack(
            group.group,
            "AwsSolutions::AwsSolutions-AS3",
            "Each launch reports its outcome through the lifecycle hook (CONTINUE, or ABANDON and a "
            "replacement), recorded in the group's activity history; a topic with no subscriber "
            "adds nothing.",
        )
        _ack(
            group.group,
            "Annotation::@aws-cdk/aws-autoscaling:desiredCapacitySet",
            "Minimum = maximum = desired = 1 by design: every deploy setting the size back to 1 is intended.",
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
