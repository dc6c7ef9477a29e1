"""NAT instances that boot: the synthesized NAT user data and boot unit under systemd, in a container.

The container joins a namespace of its own that holds the AWS side (`tests.lab.nat_cloud`: moto's EC2
behind a proxy that keeps EC2's rule on instance-wide source/dest check changes, and the lab's Auto
Scaling and CloudFormation stand-ins) and an IMDSv2 that answers as the NAT instance. Every `aws`
command of the boot script runs the real AWS CLI (`.venv/awscli`), pointed at those endpoints; an
attach of the stable interface also plays the OS, as on the instance amazon-ec2-net-utils would: the
interface appears with its address.

    python -m tests.lab.boot_nat imds --dir DIR     serves DIR's files as IMDSv2 at 169.254.169.254:80
"""

from __future__ import annotations

import argparse
import http.server
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests import netns
from tests.lab import boot, nat_cloud, server, spec, vpc

IMDS_IP = "169.254.169.254"
ROLE = "lab-nat-role"

# /usr/bin/aws in the NAT's containers: the real CLI at the namespace's endpoints.
AWS_SHIM = """#!/bin/bash
case "$1" in
  ec2) url=http://127.0.0.1:{ec2} ;;
  autoscaling) url=http://127.0.0.1:{autoscaling} ;;
  cloudformation) url=http://127.0.0.1:{cloudformation} ;;
  *) echo "aws (lab): no endpoint for $1" >&2; exit 2 ;;
esac
echo "$*" >>/var/log/lab-aws-calls
rc=0
{awscli} --endpoint-url "$url" "$@" || rc=$?
if [ "$rc" -eq 0 ] && [ "$1 $2" = "ec2 attach-network-interface" ]; then
  # EC2 attaches it; the OS brings it up with its address (amazon-ec2-net-utils on Amazon Linux 2023).
  ip link add ens6 type veth peer name ens6-peer
  ip link set ens6-peer up
  ip addr add {address}/24 dev ens6
  ip link set ens6 up
fi
exit "$rc"
"""


def user_data(synth_dir: Path, eni: str) -> str:
    """The first AZ's NAT launch template's user data from the synth, deploy-time values filled in."""
    templates = [json.loads(p.read_text()) for p in sorted(synth_dir.glob("*.template.json"))]
    texts = []
    for template in templates:
        for resource in template.get("Resources", {}).values():
            if resource["Type"] == "AWS::EC2::LaunchTemplate":
                text, intrinsics = spec._flatten(resource["Properties"]["LaunchTemplateData"]["UserData"])
                if "eip-reclaim-nat" in text:
                    texts.append((text, intrinsics))
    if not texts:
        raise RuntimeError("lab: no NAT launch template in the synth")
    text, intrinsics = texts[0]
    for placeholder, value in intrinsics.items():
        if value == {"Ref": "AWS::Region"}:
            text = text.replace(placeholder, nat_cloud.REGION)
        elif value == {"Ref": "AWS::StackName"}:
            text = text.replace(placeholder, "EipReclaim-Network")
        elif "Ref" in value and "Interface" in value["Ref"]:
            text = text.replace(placeholder, eni)
    if "@@cfn" in text:
        raise RuntimeError("lab: the NAT user data carries values the lab cannot fill")
    return text


def nat_layer(image: boot.Image, work: Path) -> Path:
    """The services' /usr layer plus the NAT's aws shim (the stable address as the synth has it)."""
    layer = work / "nat-usr"
    subprocess.run(["cp", "-al", str(image.usr_layer), str(layer)], check=True)
    aws = layer / "bin" / "aws"
    aws.unlink()
    aws.write_text(
        AWS_SHIM.replace("{awscli}", str(boot.aws_cli().resolve()))
        .replace("{ec2}", str(nat_cloud.EC2_PORT))
        .replace("{autoscaling}", str(nat_cloud.AUTOSCALING_PORT))
        .replace("{cloudformation}", str(nat_cloud.CLOUDFORMATION_PORT))
        .replace("{address}", nat_cloud.STABLE_ADDRESS)
    )
    aws.chmod(0o755)
    return layer


class NatWorld:
    """A namespace with the NAT's AWS side and IMDS; the container that boots in it."""

    def __init__(self, ns: netns.Netns, directory: Path, holder: str) -> None:
        self.ns = ns
        self.dir = directory
        records = directory / "cloud"
        records.mkdir(parents=True)
        env = {"PYTHONPATH": str(spec.REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        with (directory / "cloud.log").open("wb") as log:
            ns.popen(
                [vpc.PYTHON, "-m", "tests.lab.nat_cloud", "--dir", str(records), "--holder", holder],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        vpc.wait_for((records / "ready").exists, "the NAT's AWS side", timeout=60)
        self.ids: dict[str, str] = json.loads((records / "cloud.json").read_text())
        self.records = records
        imds = directory / "imds"
        mac = self.ids["mac"]
        credentials = {
            "Code": "Success",
            "Type": "AWS-HMAC",
            "AccessKeyId": "ASIANAT" + self.ids["instance"][2:].upper(),
            "SecretAccessKey": "lab",
            "Token": "lab",
            "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 6 * 3600)),
        }
        for path, value in {
            "instance-id": self.ids["instance"],
            "mac": mac,
            f"network/interfaces/macs/{mac}/interface-id": self.ids["primary"],
            "placement/region": nat_cloud.REGION,
            "iam/security-credentials/": ROLE,
            f"iam/security-credentials/{ROLE}": json.dumps(credentials),
        }.items():
            target = (
                imds / "meta-data" / path.rstrip("/")
                if not path.endswith("/")
                else imds / "meta-data" / path / "index"
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(value)
        ns.ip("addr", "add", f"{IMDS_IP}/32", "dev", "lo")
        ns.popen([vpc.PYTHON, "-m", "tests.lab.boot_nat", "imds", "--dir", str(imds)], env=env)
        vpc.wait_for((imds / "ready").exists, "the NAT's IMDS", timeout=30)

    def ec2_calls(self, action: str | None = None) -> list[dict[str, Any]]:
        path = self.records / "ec2.jsonl"
        calls = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [c for c in calls if action is None or c.get("Action") == action]

    def log(self, name: str) -> list[dict[str, Any]]:
        path = self.records / name
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def interface(self) -> dict[str, Any]:
        """The stable interface as moto describes it."""
        script = (
            "import boto3, json\n"
            f"c = boto3.client('ec2', endpoint_url='http://127.0.0.1:{nat_cloud.MOTO_PORT}',"
            f" region_name='{nat_cloud.REGION}', aws_access_key_id='t', aws_secret_access_key='t')\n"
            f"print(json.dumps(c.describe_network_interfaces(NetworkInterfaceIds=['{self.ids['eni']}'])"
            "['NetworkInterfaces'][0], default=str))\n"
        )
        done = self.ns.run(vpc.PYTHON, "-c", script, timeout=60)
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    def reboot_kernel_state(self) -> None:
        """What a reboot resets in the kernel (the namespace outlives the container): forwarding off,
        redirects and reverse-path filtering at their defaults, no packet filter. The attached interface
        stays, with its address, as the OS configures it at boot."""
        vpc.set_sysctls(
            self.ns,
            {
                "net.ipv4.ip_forward": "0",
                "net.ipv4.conf.all.send_redirects": "1",
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.send_redirects": "1",
                "net.ipv4.conf.default.rp_filter": "0",
            },
        )
        self.ns.run("iptables", "-F")
        self.ns.run("iptables", "-P", "FORWARD", "ACCEPT")
        self.ns.run("iptables", "-t", "nat", "-F")


def _serve_imds(directory: Path) -> None:
    tokens: set[str] = set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: str = "") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            if self.path != "/latest/api/token":
                self._reply(404)
                return
            token = secrets.token_hex(16)
            tokens.add(token)
            self._reply(200, token)

        def do_GET(self) -> None:
            if self.headers.get("X-aws-ec2-metadata-token") not in tokens:
                self._reply(401)
                return
            path = directory / self.path.removeprefix("/latest/").lstrip("/")
            if path.is_dir():
                path = path / "index"
            self._reply(200, path.read_text()) if path.is_file() else self._reply(404)

    server.start((IMDS_IP, 80), Handler)
    (directory / "ready").touch()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=("imds",))
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    _serve_imds(args.dir)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
