"""Drive the moto server of a kernel test from inside its namespace (the test process cannot reach it).

`python -m tests.kernel.seed ENDPOINT setup` waits for moto, makes this instance and another one, and an
Elastic IP held by the other; prints JSON. `associate ALLOC INSTANCE` and `holder ALLOC` do what they say.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import boto3
from botocore.exceptions import EndpointConnectionError

# A documentation-range address: moto would otherwise hand out a loopback one.
ELASTIC_IP = "198.51.100.7"


def client(endpoint: str) -> Any:
    return boto3.client(
        "ec2",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def wait_ready(ec2: Any) -> None:
    # Up to 30 s: moto's server takes a few seconds to import on a busy CI machine.
    for _ in range(600):
        try:
            ec2.describe_regions()
            return
        except EndpointConnectionError:
            time.sleep(0.05)
    raise SystemExit("moto did not start")


def setup(ec2: Any) -> dict[str, str]:
    wait_ready(ec2)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    reply = ec2.run_instances(ImageId=image, MinCount=2, MaxCount=2, InstanceType="t3.micro")
    ids = [i["InstanceId"] for i in reply["Instances"]]
    allocation = ec2.allocate_address(Domain="vpc", Address=ELASTIC_IP)["AllocationId"]
    ec2.associate_address(AllocationId=allocation, InstanceId=ids[1])
    return {"self": ids[0], "other": ids[1], "allocation_id": allocation, "public_ip": ELASTIC_IP}


def main(argv: list[str]) -> None:
    ec2 = client(argv[0])
    command = argv[1]
    if command == "setup":
        print(json.dumps(setup(ec2)))
    elif command == "associate":
        ec2.associate_address(AllocationId=argv[2], InstanceId=argv[3], AllowReassociation=True)
    elif command == "holder":
        print(ec2.describe_addresses(AllocationIds=[argv[2]])["Addresses"][0].get("InstanceId", ""))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
