"""What a run needs to make its API clients: one interface for the run and its reports (aws.ClientFactory)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

from bootstrap.imds import Credentials

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_cloudformation import CloudFormationClient
    from mypy_boto3_cloudwatch import CloudWatchClient
    from mypy_boto3_ec2 import EC2Client


class Clients(Protocol):
    """What the run needs to make API clients (the real one is `aws.ClientFactory`)."""

    def ec2(
        self, endpoint_url: Optional[str], credentials: Optional[Credentials], *, dualstack: bool = False
    ) -> EC2Client: ...

    def autoscaling(
        self, endpoint_url: Optional[str], credentials: Optional[Credentials]
    ) -> AutoScalingClient: ...

    def cloudformation(
        self, endpoint_url: Optional[str], credentials: Optional[Credentials]
    ) -> CloudFormationClient: ...

    def cloudwatch(
        self, endpoint_url: Optional[str], credentials: Optional[Credentials]
    ) -> CloudWatchClient: ...
