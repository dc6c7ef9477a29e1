"""The internet namespace's API daemon: a fault-injecting proxy in front of moto's EC2 API, and a
stand-in Auto Scaling endpoint that records CompleteLifecycleAction (moto has none) and, like Auto Scaling,
accepts it once per instance.

Faults are switched by rewriting `api-faults.json`:
  {"throttle_first": N}           the first N EC2 calls answer RequestLimitExceeded (503)
  {"unauthorized": ["Action"]}    those actions answer UnauthorizedOperation (403)
  {"delay": {"Action": seconds}}  those actions are held that long before moto sees them
A new file content starts a new count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from tests.lab import jsonl, server

EC2_PORT = 8080
AUTOSCALING_PORT = 8081
# Calls after which the gateway must follow moto before the caller hears back.
ASSOCIATION_CHANGES = {"AssociateAddress", "DisassociateAddress", "ReleaseAddress"}
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


def ec2_error(code: str, message: str) -> bytes:
    request_id = uuid.uuid4()
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
    ).encode()


class Faults:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._raw = ""
        self._spec: dict[str, Any] = {}
        self._calls = 0

    def next(self) -> dict[str, Any]:
        raw = self.path.read_text() if self.path.exists() else ""
        with self._lock:
            if raw != self._raw:
                self._raw, self._calls = raw, 0
                self._spec = json.loads(raw) if raw.strip() else {}
            self._calls += 1
            return {**self._spec, "index": self._calls, "raw": raw}

    def hold(self, seconds: float, raw: str) -> bool:
        """Sleep up to `seconds`; False as soon as the switches change (the test that asked is over)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            current = self.path.read_text() if self.path.exists() else ""
            if current != raw:
                return False
            time.sleep(0.05)
        return True


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the JSONL logs say what matters

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, body: bytes, content_type: str = "text/xml") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def ec2_handler(moto: tuple[str, int], sync_url: str, faults: Faults, log: Path) -> type[_Quiet]:
    class Handler(_Quiet):
        def do_POST(self) -> None:
            body = self.body()
            form = parse_qs(body.decode())
            action = form.get("Action", ["?"])[0]
            key = _CREDENTIAL.search(self.headers.get("Authorization", ""))
            record: dict[str, Any] = {
                "t": time.monotonic(),  # when the request arrived: the order the timeline shows
                "src": self.client_address[0],
                "action": action,
                "access_key": key.group(1) if key else None,
            }
            spec = faults.next()
            delay = float(spec.get("delay", {}).get(action, 0))
            if delay and not faults.hold(delay, spec["raw"]):
                # Dropped unanswered: a call held for a finished test must not reach moto or a later log.
                self.close_connection = True
                return
            if spec["index"] <= int(spec.get("throttle_first", 0)):
                status, answer, record["fault"] = (
                    503,
                    ec2_error("RequestLimitExceeded", "Request limit exceeded."),
                    "throttle",
                )
            elif action in spec.get("unauthorized", ()):
                message = "You are not authorized to perform this operation."
                status, answer, record["fault"] = (
                    403,
                    ec2_error("UnauthorizedOperation", message),
                    "unauthorized",
                )
            else:
                status, answer = self.forward(body)
                if action in ASSOCIATION_CHANGES and status == 200:
                    urllib.request.urlopen(
                        urllib.request.Request(sync_url, data=b"", method="POST"), timeout=5
                    )
            record["status"] = status
            record["seconds"] = round(time.monotonic() - record["t"], 4)
            jsonl.append(log, record)
            self.reply(status, answer)

        def forward(self, body: bytes) -> tuple[int, bytes]:
            connection = http.client.HTTPConnection(*moto, timeout=30)
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


AUTOSCALING_NS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"


def autoscaling_error(code: str, message: str) -> bytes:
    return (
        f'<ErrorResponse xmlns="{AUTOSCALING_NS}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{message}</Message></Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
    ).encode()


def autoscaling_handler(log: Path) -> type[_Quiet]:
    """Each instance's launch action is pending once: completing it again (a reboot, the re-check
    timer) gets the ValidationError Auto Scaling answers when no action is pending."""
    completed: set[str] = set()
    lock = threading.Lock()

    class Handler(_Quiet):
        def do_POST(self) -> None:
            form = {k: v[0] for k, v in parse_qs(self.body().decode()).items()}
            action = form.get("Action", "?")
            instance = form.get("InstanceId", "")
            if action != "CompleteLifecycleAction":
                status, answer = 400, autoscaling_error("InvalidAction", f"{action} is not served by the lab")
            else:
                with lock:
                    pending = instance not in completed
                    completed.add(instance)
                if pending:
                    status, answer = (
                        200,
                        (
                            f'<CompleteLifecycleActionResponse xmlns="{AUTOSCALING_NS}">'
                            "<CompleteLifecycleActionResult/>"
                            f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
                            "</CompleteLifecycleActionResponse>"
                        ).encode(),
                    )
                else:
                    message = f"No active Lifecycle Action found with instance ID {instance}"
                    status, answer = 400, autoscaling_error("ValidationError", message)
            jsonl.append(log, {"src": self.client_address[0], **form, "status": status})
            self.reply(status, answer)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--moto-port", type=int, required=True)
    parser.add_argument("--sync-url", required=True)
    args = parser.parse_args()
    ec2 = ec2_handler(
        ("127.0.0.1", args.moto_port),
        args.sync_url,
        Faults(args.dir / "api-faults.json"),
        args.dir / "ec2.jsonl",
    )
    server.start(("0.0.0.0", EC2_PORT), ec2)
    server.start(("0.0.0.0", AUTOSCALING_PORT), autoscaling_handler(args.dir / "autoscaling.jsonl"))
    (args.dir / "api.ready").touch()
    threading.Event().wait()


if __name__ == "__main__":
    main()
