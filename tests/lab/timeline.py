"""One readable timeline from everything the lab records: its own events, each payload's log lines,
the API and Auto Scaling calls, the gateway's changes and the client probe's transitions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.lab import jsonl, vpc

_ELAPSED = re.compile(r"^\+\s*(\d+) ms (.*)$")


def probe_transitions(records: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """Where the client's view changes: first success, first failure, a new instance answering.

    Ordered by when each request was sent: a request that timed out finishes after later ones succeed.
    """
    out = []
    state: str | None = None
    for record in sorted(records, key=lambda r: float(r["started"])):
        now = f"answered by {record['body']}" if record["ok"] else "no answer"
        if now != state:
            out.append((float(record["started"]), f"client: requests sent from here on {now} at {vpc.EIP}"))
            state = now
    return out


def first_success(probe_log: Path, instance_id: str, after: float) -> float | None:
    """When the client first got an answer from this instance (completion time), or None."""
    times = [
        float(r["t"])
        for r in jsonl.read(probe_log)
        if r["ok"] and r.get("body") == instance_id and float(r["started"]) >= after
    ]
    return min(times) if times else None


def collect(lab: vpc.Lab) -> list[tuple[float, str, str]]:
    """(time, source, text) in time order."""
    lines: list[tuple[float, str, str]] = []
    for event in lab.timeline:
        details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("t", "event"))
        lines.append((float(event["t"]), "lab", f"{event['event']} {details}".strip()))
    for instance in lab.instances:
        for run in instance.runs:
            for t, line in run.lines:
                match = _ELAPSED.match(line)
                lines.append((t, f"payload {instance.instance_id[-6:]}", match.group(2) if match else line))
    for call in lab.ec2_calls():
        fault = f" [{call['fault']}]" if call.get("fault") else ""
        lines.append(
            (float(call["t"]), "ec2 api", f"{call['action']} from {call['src']} -> {call['status']}{fault}")
        )
    for call in lab.lifecycle_calls():
        text = f"{call.get('Action')} {call.get('LifecycleActionResult')} for {call.get('InstanceId')}"
        lines.append((float(call["t"]), "autoscaling", f"{text} from {call['src']}"))
    for change in jsonl.read(lab.dir / "gateway.jsonl"):
        if change.get("event") == "gateway":
            mapping = ", ".join(f"{eip} -> {ip}" for eip, ip in change["mapping"].items()) or "nothing"
            lines.append((float(change["t"]), "gateway", f"1:1 NAT now {mapping}"))
    for t, text in probe_transitions(jsonl.read(lab.dir / "probe.jsonl")):
        lines.append((t, "client", text))
    return sorted(lines)


def render(lab: vpc.Lab, origin: float) -> str:
    return "\n".join(f"{t - origin:8.3f} s  {source:<16} {text}" for t, source, text in collect(lab))
