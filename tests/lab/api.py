"""The internet namespace's API daemon: a fault-injecting proxy in front of moto's EC2 API, and
stand-ins that record what moto does not serve: Auto Scaling's CompleteLifecycleAction (accepted once per
instance, like Auto Scaling), CloudFormation's SignalResource (accepted once per instance, as a stack
being deployed does; afterwards "cannot be signaled", as outside a deployment) and CloudWatch's
PutMetricData (every protocol botocore may speak: query, JSON, RPC v2 CBOR).

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
CLOUDFORMATION_PORT = 8082
CLOUDWATCH_PORT = 8083
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
    timer) gets the ValidationError Auto Scaling answers when no action is pending. An instance of a
    warm pool has a second one (into the pool, then out of it): `lifecycle-actions.json` beside the log
    says how many actions the lab opened per instance. SetInstanceHealth is recorded in
    `autoscaling-health.jsonl` and accepted."""
    completed: dict[str, int] = {}
    lock = threading.Lock()
    opened_file = log.with_name("lifecycle-actions.json")
    health_log = log.with_name("autoscaling-health.jsonl")

    def opened(instance: str) -> int:
        raw = opened_file.read_text() if opened_file.exists() else ""
        return int((json.loads(raw) if raw.strip() else {}).get(instance, 1))

    class Handler(_Quiet):
        def do_POST(self) -> None:
            form = {k: v[0] for k, v in parse_qs(self.body().decode()).items()}
            action = form.get("Action", "?")
            instance = form.get("InstanceId", "")
            if action == "SetInstanceHealth":
                jsonl.append(health_log, {"t": time.monotonic(), "src": self.client_address[0], **form})
                self.reply(
                    200,
                    (
                        f'<SetInstanceHealthResponse xmlns="{AUTOSCALING_NS}"><ResponseMetadata>'
                        f"<RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata></SetInstanceHealthResponse>"
                    ).encode(),
                )
                return
            if action != "CompleteLifecycleAction":
                status, answer = 400, autoscaling_error("InvalidAction", f"{action} is not served by the lab")
            else:
                with lock:
                    pending = completed.get(instance, 0) < opened(instance)
                    if pending:
                        completed[instance] = completed.get(instance, 0) + 1
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


CLOUDFORMATION_NS = "http://cloudformation.amazonaws.com/doc/2010-05-15/"


def cloudformation_handler(log: Path) -> type[_Quiet]:
    """SignalResource: the first signal of each instance is awaited; any later one finds nothing waiting."""
    signaled: set[tuple[str, str, str]] = set()
    lock = threading.Lock()

    class Handler(_Quiet):
        def do_POST(self) -> None:
            form = {k: v[0] for k, v in parse_qs(self.body().decode()).items()}
            action = form.get("Action", "?")
            if action != "SignalResource":
                status, answer = (
                    400,
                    _query_error(CLOUDFORMATION_NS, "InvalidAction", f"{action} is not served"),
                )
            else:
                key = (form.get("StackName", ""), form.get("LogicalResourceId", ""), form.get("UniqueId", ""))
                with lock:
                    waiting = key not in signaled
                    signaled.add(key)
                if waiting:
                    status, answer = (
                        200,
                        (
                            f'<SignalResourceResponse xmlns="{CLOUDFORMATION_NS}"><ResponseMetadata>'
                            f"<RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata></SignalResourceResponse>"
                        ).encode(),
                    )
                else:
                    message = f"Stack {key[0]} is in UPDATE_COMPLETE state and cannot be signaled"
                    status, answer = 400, _query_error(CLOUDFORMATION_NS, "ValidationError", message)
            jsonl.append(
                log, {"t": time.monotonic(), "src": self.client_address[0], **form, "status": status}
            )
            self.reply(status, answer)

    return Handler


def _query_error(namespace: str, code: str, message: str) -> bytes:
    return (
        f'<ErrorResponse xmlns="{namespace}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{message}</Message></Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
    ).encode()


def cloudwatch_handler(log: Path) -> type[_Quiet]:
    """PutMetricData, recorded as {"Namespace", "MetricData": [{"MetricName", "Value", ...}]}."""

    class Handler(_Quiet):
        def do_POST(self) -> None:
            body = self.body()
            protocol = self.headers.get("smithy-protocol", "")
            if protocol == "rpc-v2-cbor":
                from botocore.parsers import RpcV2CBORParser  # botocore's own CBOR decoder

                request = RpcV2CBORParser()._initial_body_parse(body) or {}
                action = self.path.rsplit("/", 1)[-1]
                headers = {"smithy-protocol": "rpc-v2-cbor", "Content-Type": "application/cbor"}
                answer = b"\xa0"  # an empty CBOR map: PutMetricData has no output
            elif "X-Amz-Target" in self.headers:
                request = json.loads(body or b"{}")
                action = self.headers["X-Amz-Target"].rsplit(".", 1)[-1]
                headers = {"Content-Type": "application/x-amz-json-1.0"}
                answer = b"{}"
            else:
                form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
                action = form.pop("Action", "?")
                request = _query_metrics(form)
                headers = {"Content-Type": "text/xml"}
                answer = (
                    '<PutMetricDataResponse xmlns="http://monitoring.amazonaws.com/doc/2010-08-01/">'
                    f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
                    "</PutMetricDataResponse>"
                ).encode()
            status = 200 if action == "PutMetricData" else 400
            record = {
                "t": time.monotonic(),
                "src": self.client_address[0],
                "action": action,
                "status": status,
            }
            jsonl.append(log, {**record, **json.loads(json.dumps(request, default=str))})
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    return Handler


def _query_metrics(form: dict[str, str]) -> dict[str, Any]:
    """MetricData.member.N.MetricName=... back into the shape the other protocols carry."""
    data: dict[int, dict[str, Any]] = {}
    for key, value in form.items():
        match = re.fullmatch(r"MetricData\.member\.(\d+)\.(MetricName|Value|Unit)", key)
        if match:
            data.setdefault(int(match.group(1)), {})[match.group(2)] = (
                float(value) if match.group(2) == "Value" else value
            )
    return {"Namespace": form.get("Namespace"), "MetricData": [data[i] for i in sorted(data)]}


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
    handlers = {
        EC2_PORT: ec2,
        AUTOSCALING_PORT: autoscaling_handler(args.dir / "autoscaling.jsonl"),
        CLOUDFORMATION_PORT: cloudformation_handler(args.dir / "cloudformation.jsonl"),
        CLOUDWATCH_PORT: cloudwatch_handler(args.dir / "cloudwatch.jsonl"),
    }
    # On IPv4 and IPv6 (the ipv6 strategy's EC2 endpoint), one handler class (so one state) per service.
    for port, handler in handlers.items():
        for address in ("0.0.0.0", "::"):
            server.start((address, port), handler)
    (args.dir / "api.ready").touch()
    threading.Event().wait()


if __name__ == "__main__":
    main()
