"""The floor the payload is measured against: only create the EC2 client and make the same API calls
(describe, associate, describe). No routes, no IMDS, no checks, no lifecycle call.
"""

from __future__ import annotations

import sys

import boto3  # type: ignore[import-untyped]


def main(endpoint: str, region: str, allocation_id: str, instance_id: str) -> int:
    ec2 = boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="floor",
        aws_secret_access_key="floor",
    )
    ec2.describe_addresses(AllocationIds=[allocation_id])
    ec2.associate_address(AllocationId=allocation_id, InstanceId=instance_id, AllowReassociation=True)
    ec2.describe_addresses(AllocationIds=[allocation_id])
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
