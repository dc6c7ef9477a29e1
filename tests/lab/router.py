"""The VPC router namespace's daemon: the IMDS (by source address) and the internet gateway.

The gateway forwards for an instance only while moto says the Elastic IP is associated with it:
it polls moto every 50 ms and is also poked by the API proxy right after every call that changes
an association, so the NAT rules follow the API before the caller sees the answer.

Also the NAT namespaces' own IMDS (`--fixed-identity`): it answers as the NAT instance, so an
instance whose IMDS pin is missing gets the NAT's identity, as on a real NAT instance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.lab import imds, jsonl, server

# Fast enough that the gateway follows an association well inside one client probe interval.
POLL_SECONDS = 0.05
SYNC_PORT = 9000
UPLINK = "uplink"


def describe_addresses(moto_url: str, region: str) -> dict[str, str]:
    """{Elastic IP: private IP} for every associated address, straight from moto (no proxy faults)."""
    body = b"Action=DescribeAddresses&Version=2016-11-15"
    request = urllib.request.Request(
        moto_url,
        data=body,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            # moto reads the region from the credential scope; the signature is not checked.
            "Authorization": f"AWS4-HMAC-SHA256 Credential=lab/20260101/{region}/ec2/aws4_request, "
            "SignedHeaders=host, Signature=0",
        },
    )
    with urllib.request.urlopen(request, timeout=2) as answer:
        root = ET.fromstring(answer.read())
    mapping = {}
    for item in root.iter():
        if not item.tag.endswith("item"):
            continue
        fields = {child.tag.split("}")[-1]: (child.text or "") for child in item}
        if fields.get("publicIp") and fields.get("privateIpAddress"):
            mapping[fields["publicIp"]] = fields["privateIpAddress"]
    return mapping


def ruleset(mapping: dict[str, str]) -> str:
    """The gateway as one nft transaction: replaced whole, so there is never a half-applied state."""
    dnat = "".join(f'    iifname "{UPLINK}" ip daddr {eip} dnat to {ip}\n' for eip, ip in mapping.items())
    snat = "".join(f'    oifname "{UPLINK}" ip saddr {ip} snat to {eip}\n' for eip, ip in mapping.items())
    allow = "".join(f'    oifname "{UPLINK}" ip saddr {ip} accept\n' for ip in mapping.values())
    return (
        "table ip igw\ndelete table ip igw\n"
        "table ip igw {\n"
        "  chain pre {\n    type nat hook prerouting priority dstnat; policy accept;\n" + dnat + "  }\n"
        "  chain post {\n    type nat hook postrouting priority srcnat; policy accept;\n" + snat + "  }\n"
        "  chain forward {\n    type filter hook forward priority filter; policy accept;\n"
        # Bridged frames pass this hook too (bridge-nf-call-iptables): match routed traffic by the uplink.
         + allow + f'    oifname "{UPLINK}" drop\n'
        f'    iifname "{UPLINK}" ct status dnat accept\n'
        f'    iifname "{UPLINK}" ct state established,related accept\n'
        f'    iifname "{UPLINK}" drop\n'
        "  }\n}\n"
    )


# Records every new connection an instance tries towards the internet (allowed or not), so a test
# can prove an attempt was made even when the gateway dropped it.
AUDIT = (
    "table ip audit {\n"
    "  set out { type ipv4_addr . inet_service; flags dynamic; counter; }\n"
    "  chain forward_audit {\n"
    "    type filter hook forward priority -10; policy accept;\n"
    f'    oifname "{UPLINK}" ct state new update @out {{ ip saddr . tcp dport }}\n'
    "  }\n}\n"
)


def nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)


class Gateway:
    """Keeps the nft rules equal to moto's associations."""

    def __init__(self, moto_url: str, region: str, log: Path) -> None:
        self.moto_url, self.region, self.log = moto_url, region, log
        self.mapping: dict[str, str] = {}
        self._lock = threading.Lock()

    def sync(self) -> None:
        with self._lock:
            try:
                mapping = describe_addresses(self.moto_url, self.region)
            except OSError as error:
                jsonl.append(self.log, {"event": "poll-failed", "error": str(error)})
                return
            if mapping == self.mapping:
                return
            nft(ruleset(mapping))
            # Forget translations made for a previous holder, or its flows would keep the address.
            for eip, ip in self.mapping.items():
                if mapping.get(eip) != ip:
                    for flag in ("--orig-dst", "--reply-dst"):
                        subprocess.run(["conntrack", "-D", flag, eip], capture_output=True, check=False)
            self.mapping = mapping
            jsonl.append(self.log, {"event": "gateway", "mapping": mapping})

    def public_ipv4(self, private_ip: str) -> str | None:
        return next((eip for eip, ip in self.mapping.items() if ip == private_ip), None)

    def run(self) -> None:
        while True:
            self.sync()
            time.sleep(POLL_SECONDS)


def serve_sync(address: str, gateway: Gateway) -> None:
    """POST /sync: re-read moto now (the API proxy calls it after association changes)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            gateway.sync()
            self.send_response(204)
            self.end_headers()

    server.start((address, SYNC_PORT), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True, help="the lab's directory (logs, switches)")
    parser.add_argument("--name", required=True, help="log and fault file prefix")
    parser.add_argument("--fixed-identity", help="JSON identity: answer every source with it (a NAT)")
    parser.add_argument("--moto-url", help="moto, reached directly over the uplink")
    parser.add_argument("--region")
    parser.add_argument("--sync-address", help="where the proxy pokes the gateway")
    args = parser.parse_args()

    faults = imds.Faults(args.dir / f"{args.name}-imds-faults.json")
    log = args.dir / f"{args.name}-imds.jsonl"
    if args.fixed_identity:
        fixed = json.loads(args.fixed_identity)
        imds.serve(
            "169.254.169.254",
            identify=lambda _src: fixed,
            public_ipv4=lambda _ip: None,
            faults=faults,
            log_path=log,
        )
    else:
        registry = args.dir / "registry.json"
        gateway = Gateway(args.moto_url, args.region, args.dir / "gateway.jsonl")
        nft(AUDIT)
        nft(ruleset({}))

        def identify(source: str) -> imds.Identity | None:
            known: dict[str, imds.Identity] = json.loads(registry.read_text()) if registry.exists() else {}
            return known.get(source)

        imds.serve(
            "169.254.169.254", identify=identify, public_ipv4=gateway.public_ipv4, faults=faults, log_path=log
        )
        serve_sync(args.sync_address, gateway)
        threading.Thread(target=gateway.run, daemon=True).start()
    (args.dir / f"{args.name}.ready").touch()
    threading.Event().wait()


if __name__ == "__main__":
    main()
