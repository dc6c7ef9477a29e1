"""An IMDSv2 emulator: identity by source address (the VPC router's) or one fixed identity (a NAT's)."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.lab import jsonl, server

TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"

# Identity of one instance as IMDS tells it; keys as in `Identity` below.
Identity = dict[str, Any]

# The values Auto Scaling documents for autoscaling/target-lifecycle-state: the steady states an
# instance is moving to (transitional states such as Warmed:Pending:Wait are never targets).
# aws-facts: stand-in-imds-target-states
TARGET_LIFECYCLE_STATES = (
    "InService",
    "Terminated",
    "Detached",
    "Standby",
    "Warmed:Hibernated",
    "Warmed:Running",
    "Warmed:Stopped",
    "Warmed:Terminated",
)


def target_lifecycle_state(value: str) -> str:
    """`value` if AWS documents it as a target lifecycle state; ValueError otherwise."""
    if value not in TARGET_LIFECYCLE_STATES:
        raise ValueError(
            f"target lifecycle state {value!r} is not one AWS documents: {', '.join(TARGET_LIFECYCLE_STATES)}"
        )
    return value


class Faults:
    """Switches read from a JSON file the lab rewrites: {"error_first": N, "status": 500, "delay": s}.

    A new file content starts a new count, so a test's "first N requests fail" means its own first N.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._raw = ""
        self._spec: dict[str, Any] = {}
        self._served = 0

    def next(self) -> dict[str, Any]:
        """The spec in force and the index of this request under it."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            raw = ""
        with self._lock:
            if raw != self._raw:
                self._raw, self._served = raw, 0
                self._spec = json.loads(raw) if raw.strip() else {}
            self._served += 1
            return {**self._spec, "index": self._served}


def metadata(identity: Identity, public_ipv4: str | None) -> dict[str, str]:
    """Every path this emulator answers, below /latest/meta-data/."""
    mac = identity["mac"]
    net = f"network/interfaces/macs/{mac}/"
    role = identity["role"]
    creds = {
        "Code": "Success",
        "LastUpdated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "Type": "AWS-HMAC",
        "AccessKeyId": identity["access_key_id"],
        "SecretAccessKey": "lab-secret-" + identity["instance_id"],
        "Token": "lab-token-" + identity["instance_id"],
        "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 6 * 3600)),
    }
    tags: dict[str, str] = identity.get("tags", {})
    paths = {
        "instance-id": identity["instance_id"],
        "mac": mac,
        "local-ipv4": identity["private_ip"],
        "placement/availability-zone": identity["az"],
        "placement/region": identity["region"],
        net + "subnet-id": identity["subnet_id"],
        net + "subnet-ipv4-cidr-block": identity["subnet_cidr"],
        net + "vpc-ipv4-cidr-block": identity["vpc_cidr"],
        net + "vpc-ipv4-cidr-blocks": identity["vpc_cidr"],
        net + "local-ipv4s": identity["private_ip"],
        "iam/security-credentials/": role,
        f"iam/security-credentials/{role}": json.dumps(creds),
        "tags/instance/": "\n".join(tags),
    }
    paths.update({f"tags/instance/{k}": v for k, v in tags.items()})
    if identity.get("target_lifecycle_state"):
        # Where Auto Scaling takes the instance (InService, Warmed:Stopped...): only once the lab set it.
        paths["autoscaling/target-lifecycle-state"] = target_lifecycle_state(
            identity["target_lifecycle_state"]
        )
    if identity.get("spot_instance_action"):
        # The two-minute Spot interruption notice ({"action": "stop", "time": ...}), once the lab sent it.
        paths["spot/instance-action"] = json.dumps(identity["spot_instance_action"])
    if public_ipv4:
        paths["public-ipv4"] = public_ipv4
        paths[net + "public-ipv4s"] = public_ipv4
    return paths


def serve(
    address: str,
    *,
    identify: Callable[[str], Identity | None],
    public_ipv4: Callable[[str], str | None],
    faults: Faults,
    log_path: Path,
) -> server.Server:
    """Start an IMDS on address:80 in a thread; every request is logged with its source."""
    tokens: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # every request goes to the JSONL log instead

        def _reply(self, status: int, body: str = "") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            jsonl.append(
                log_path,
                {"src": self.client_address[0], "method": self.command, "path": self.path, "status": status},
            )

        def _faulted(self) -> bool:
            spec = faults.next()
            if spec.get("delay"):
                time.sleep(float(spec["delay"]))
            if spec["index"] <= int(spec.get("error_first", 0)):
                self._reply(int(spec.get("status", 500)), "fault injected by the lab")
                return True
            return False

        def do_PUT(self) -> None:
            if self._faulted():
                return
            if self.path != "/latest/api/token" or not self.headers.get(TTL_HEADER):
                self._reply(400)
                return
            token = secrets.token_urlsafe(24)
            tokens.add(token)
            self._reply(200, token)

        def do_GET(self) -> None:
            if self._faulted():
                return
            if self.headers.get(TOKEN_HEADER) not in tokens:
                self._reply(401)  # IMDSv2 only: no token, no answer
                return
            identity = identify(self.client_address[0])
            prefix = "/latest/meta-data/"
            if identity is None or not self.path.startswith(prefix):
                self._reply(404)
                return
            answer = metadata(identity, public_ipv4(identity["private_ip"])).get(self.path[len(prefix) :])
            if answer is None:
                self._reply(404)
            else:
                self._reply(200, answer)

    return server.start((address, 80), Handler)
