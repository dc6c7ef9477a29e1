"""A small IMDSv2 emulator for the kernel tests: one identity, tokens required, requests logged.

Run inside a namespace: `python -m tests.kernel.fake_imds --host H --port P --identity FILE --log FILE`.
The identity file is JSON: instance_id, mac, subnet_id, subnet_cidr, vpc_cidrs (list), public_ipv4
(null for none), role (null for none).
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"


def metadata(identity: dict[str, Any]) -> dict[str, str]:
    mac = identity["mac"]
    base = f"network/interfaces/macs/{mac}"
    paths = {
        "instance-id": identity["instance_id"],
        "mac": mac,
        f"{base}/subnet-id": identity["subnet_id"],
        f"{base}/subnet-ipv4-cidr-block": identity["subnet_cidr"],
        f"{base}/vpc-ipv4-cidr-blocks": "\n".join(identity["vpc_cidrs"]),
    }
    if identity.get("public_ipv4"):
        paths["public-ipv4"] = identity["public_ipv4"]
    role = identity.get("role")
    if role:
        paths["iam/security-credentials/"] = role
        paths[f"iam/security-credentials/{role}"] = json.dumps(
            {
                "Code": "Success",
                "Type": "AWS-HMAC",
                "AccessKeyId": "ASIAFAKEFAKEFAKE",
                "SecretAccessKey": "fake-secret-never-logged",
                "Token": "fake-session-token-never-logged",
                "Expiration": "2099-01-01T00:00:00Z",
            }
        )
    return paths


class Handler(BaseHTTPRequestHandler):
    server: Server

    def _log(self, status: int) -> None:
        with self.server.lock, self.server.log_path.open("a") as log:
            log.write(json.dumps({"method": self.command, "path": self.path, "status": status}) + "\n")

    def _reply(self, status: int, body: str = "") -> None:
        data = body.encode()
        # Logged before the answer leaves, so a client that has its answer also finds it in the log.
        self._log(status)
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        if self.path != "/latest/api/token" or not self.headers.get(TTL_HEADER):
            self._reply(400)
            return
        token = secrets.token_urlsafe(16)
        self.server.tokens.add(token)
        self._reply(200, token)

    def do_GET(self) -> None:
        # IMDSv2 only: a request without a valid token is refused, like an instance with tokens required.
        if self.headers.get(TOKEN_HEADER) not in self.server.tokens:
            self._reply(401)
            return
        prefix = "/latest/meta-data/"
        value = self.server.paths.get(self.path[len(prefix) :]) if self.path.startswith(prefix) else None
        if value is None:
            self._reply(404)
        else:
            self._reply(200, value)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], identity: dict[str, Any], log_path: Path) -> None:
        super().__init__(address, Handler)
        self.paths = metadata(identity)
        self.tokens: set[str] = set()
        self.lock = threading.Lock()
        self.log_path = log_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--identity", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path)
    args = parser.parse_args()
    server = Server((args.host, args.port), json.loads(args.identity.read_text()), args.log)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
