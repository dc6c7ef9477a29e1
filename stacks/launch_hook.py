"""The launch lifecycle hook that holds a group's instances until their own boot says they are ready."""

from __future__ import annotations

from aws_cdk import aws_autoscaling as autoscaling


def hold_launches(group: autoscaling.AutoScalingGroup, *, name: str, timeout_seconds: int) -> None:
    """A launch hook in the group's own specification, defaulting to ABANDON after `timeout_seconds`.

    Escape hatch: in the group's specification (not a separate AWS::AutoScaling::LifecycleHook) it also
    holds the very first instance, which the group launches before a separate hook resource exists.
    """
    cfn_group = group.node.default_child
    assert isinstance(cfn_group, autoscaling.CfnAutoScalingGroup)
    cfn_group.lifecycle_hook_specification_list = [
        autoscaling.CfnAutoScalingGroup.LifecycleHookSpecificationProperty(
            lifecycle_hook_name=name,
            lifecycle_transition="autoscaling:EC2_INSTANCE_LAUNCHING",
            default_result="ABANDON",
            heartbeat_timeout=timeout_seconds,
        )
    ]
