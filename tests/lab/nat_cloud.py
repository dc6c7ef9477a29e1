"""The AWS side of the NAT boot tests, run inside the test's namespace: moto's EC2 behind a proxy that
keeps one EC2 rule moto does not model, and the lab's Auto Scaling and CloudFormation stand-ins.

The NAT's boot script then runs the real AWS CLI against these endpoints, so every command it sends is
parsed by the CLI itself and answered by moto (or, for the calls moto does not serve, by the lab's
stand-ins). The rule the proxy adds: with more than one network interface attached, EC2 refuses an
instance-wide source/dest check change (`InvalidInstanceID`, "There are multiple interfaces attached to
instance ..."); moto 5.2 accepts it.

    python -m tests.lab.nat_cloud --dir DIR [--holder none|self|other] [--source-dest-check on|off]
                                  [--unauthorized Action ...]

writes DIR/cloud.json (the seeded ids) and DIR/ready once every endpoint listens.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3  # type: ignore[import-untyped]
from moto.server import ThreadedMotoServer

from tests.lab import api, jsonl, server

REGION = "ap-southeast-2"
MOTO_PORT = 5000
EC2_PORT = 8080
AUTOSCALING_PORT = 8081
CLOUDFORMATION_PORT = 8082
ENDPOINTS = {
    "ec2": f"http://127.0.0.1:{EC2_PORT}",
    "autoscaling": f"http://127.0.0.1:{AUTOSCALING_PORT}",
    "cloudformation": f"http://127.0.0.1:{CLOUDFORMATION_PORT}",
}
STABLE_ADDRESS = "10.0.0.4"
MULTIPLE_INTERFACES = (
    "There are multiple interfaces attached to instance '{instance}'. "
    "Please specify an interface ID for the operation instead."
)


def _client() -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=f"http://127.0.0.1:{MOTO_PORT}",
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def seed(holder: str, source_dest_check: bool) -> dict[str, str]:
    """A subnet, the NAT instance, and the stable interface (free, on this NAT, or on a predecessor)."""
    ec2 = _client()
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24", AvailabilityZone=f"{REGION}a")
    subnet_id = subnet["Subnet"]["SubnetId"]
    image = ec2.describe_images()["Images"][0]["ImageId"]

    def launch() -> dict[str, Any]:
        made = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet_id)
        return made["Instances"][0]  # type: ignore[no-any-return]

    nat = launch()
    (primary,) = nat["NetworkInterfaces"]
    stable = ec2.create_network_interface(SubnetId=subnet_id, PrivateIpAddress=STABLE_ADDRESS)
    eni = stable["NetworkInterface"]["NetworkInterfaceId"]
    if holder == "self":
        ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=nat["InstanceId"], DeviceIndex=1)
    elif holder == "other":
        old = launch()
        ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=old["InstanceId"], DeviceIndex=1)
    if not source_dest_check:
        ec2.modify_network_interface_attribute(
            NetworkInterfaceId=primary["NetworkInterfaceId"], SourceDestCheck={"Value": False}
        )
    return {
        "instance": nat["InstanceId"],
        "mac": primary["MacAddress"],
        "primary": primary["NetworkInterfaceId"],
        "eni": eni,
    }


def ec2_proxy(log: Path, unauthorized: set[str]) -> type[api._Quiet]:
    """Forwards to moto; refuses what EC2 refuses and moto does not; every call lands in `log`."""

    class Handler(api._Quiet):
        def do_POST(self) -> None:
            body = self.body()
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            action = form.get("Action", "?")
            refusal = self.refusal(action, form)
            if refusal is not None:
                status, answer = refusal
            else:
                status, answer = self.forward(body)
            jsonl.append(log, {"t": time.monotonic(), **form, "status": status})
            self.reply(status, answer)

        def refusal(self, action: str, form: dict[str, str]) -> tuple[int, bytes] | None:
            if action in unauthorized:
                message = "You are not authorized to perform this operation."
                return 403, api.ec2_error("UnauthorizedOperation", message)
            if action == "ModifyInstanceAttribute" and "SourceDestCheck.Value" in form:
                instance = form.get("InstanceId", "")
                found = _client().describe_instances(InstanceIds=[instance])["Reservations"]
                interfaces = found[0]["Instances"][0]["NetworkInterfaces"] if found else []
                if len(interfaces) > 1:
                    message = MULTIPLE_INTERFACES.format(instance=instance)
                    return 400, api.ec2_error("InvalidInstanceID", message)
            return None

        def forward(self, body: bytes) -> tuple[int, bytes]:
            connection = http.client.HTTPConnection("127.0.0.1", MOTO_PORT, timeout=30)
            try:
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")
                }
                connection.request("POST", self.path, body=body, headers=headers)
                answer = connection.getresponse()
                return answer.status, answer.read()
            finally:
                connection.close()

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--holder", choices=("none", "self", "other"), default="none")
    parser.add_argument("--source-dest-check", choices=("on", "off"), default="on")
    parser.add_argument("--unauthorized", nargs="*", default=[])
    args = parser.parse_args()
    ThreadedMotoServer(ip_address="127.0.0.1", port=MOTO_PORT, verbose=False).start()
    ids = seed(args.holder, args.source_dest_check == "on")
    server.start(("127.0.0.1", EC2_PORT), ec2_proxy(args.dir / "ec2.jsonl", set(args.unauthorized)))
    server.start(("127.0.0.1", AUTOSCALING_PORT), api.autoscaling_handler(args.dir / "autoscaling.jsonl"))
    server.start(
        ("127.0.0.1", CLOUDFORMATION_PORT), api.cloudformation_handler(args.dir / "cloudformation.jsonl")
    )
    (args.dir / "cloud.json").write_text(json.dumps(ids))
    (args.dir / "ready").touch()
    threading.Event().wait()


if __name__ == "__main__":
    main()
