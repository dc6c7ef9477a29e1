"""Handovers in the VPC lab as a client sees them: a client polling the Elastic IP every 50 ms, and the
steps of a launch-first handover (the new instance takes the address beside the old one, the old one
yields, then goes).

    python -m tests.lab.handover --address 203.0.113.10 --log poll.jsonl   # the client (in the lab)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab import jsonl, probe, vpc

# A client that polls every 50 ms: what a user's health check or a busy client would see.
INTERVAL = 0.05
LOG_NAME = "handover-poll.jsonl"
TEMPLATE_ID_TAG = "aws:ec2launchtemplate:id"
TEMPLATE_VERSION_TAG = "aws:ec2launchtemplate:version"
LAB_TEMPLATE_ID = "lt-0123456789abcdef0"


@dataclass(frozen=True)
class ClientView:
    """What the polling client saw across one handover."""

    answered_by: list[str]  # who answered, in the order the requests were sent, repeats collapsed
    gap_seconds: float  # time without an answer beyond the poll's own cadence (0: never missed one)
    switch_seconds: float  # from the last request the old instance answered to the first the new one did
    unanswered: int  # requests sent between the old instance's last answer and the new one's first
    polls: int


def start_client(lab: vpc.Lab) -> subprocess.Popen[bytes]:
    """The client in the internet namespace, polling the Elastic IP into LOG_NAME."""
    (lab.dir / LOG_NAME).write_text("")
    return lab.internet.popen(
        [vpc.PYTHON, "-m", "tests.lab.handover", "--address", vpc.EIP, "--log", str(lab.dir / LOG_NAME)],
        cwd=vpc.REPO,
        env={"PYTHONPATH": str(vpc.REPO)},
    )


def stop_client(client: subprocess.Popen[bytes]) -> None:
    client.kill()
    client.wait(10)


def wait_for_answer(lab: vpc.Lab, instance: vpc.Instance, after: float, timeout: float = 10) -> None:
    """Until the client has had an answer from `instance` for a request sent after `after`."""
    vpc.wait_for(
        lambda: any(
            r["ok"] and r.get("body") == instance.instance_id and float(r["started"]) >= after
            for r in jsonl.read(lab.dir / LOG_NAME)
        ),
        f"the client's answer from {instance.instance_id}",
        timeout=timeout,
    )


def client_view(lab: vpc.Lab, old: vpc.Instance, new: vpc.Instance) -> ClientView:
    """The client's log read as one handover from `old` to `new`."""
    records = sorted(jsonl.read(lab.dir / LOG_NAME), key=lambda r: float(r["started"]))
    answered = [r for r in records if r["ok"]]
    order: list[str] = []
    for record in answered:
        if not order or order[-1] != record["body"]:
            order.append(str(record["body"]))
    last_old = max(float(r["started"]) for r in answered if r["body"] == old.instance_id)
    first_new = min(float(r["started"]) for r in answered if r["body"] == new.instance_id)
    between = [r for r in records if last_old < float(r["started"]) < first_new]
    return ClientView(
        answered_by=order,
        gap_seconds=max(0.0, first_new - last_old - INTERVAL) if between else 0.0,
        switch_seconds=first_new - last_old,
        unanswered=sum(1 for r in between if not r["ok"]),
        polls=len(records),
    )


def tag_launch(lab: vpc.Lab, instance: vpc.Instance, version: int) -> None:
    """EC2's reserved tags on an instance launched from the group's launch template."""
    tags = [
        {"Key": TEMPLATE_ID_TAG, "Value": LAB_TEMPLATE_ID},
        {"Key": TEMPLATE_VERSION_TAG, "Value": str(version)},
    ]
    lab.in_internet(lambda: lab.ec2().create_tags(Resources=[instance.instance_id], Tags=tags))


def send_interruption_notice(lab: vpc.Lab, instance: vpc.Instance, action: str = "stop") -> dict[str, Any]:
    """EC2's two-minute Spot interruption notice, as IMDS `spot/instance-action` gives it."""
    notice = {
        "action": action,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120)),
    }
    lab.identities[instance.private_ip]["spot_instance_action"] = notice
    vpc._write_atomically(lab.dir / "registry.json", json.dumps(lab.identities))
    lab.event("spot-interruption-notice", instance=instance.instance_id, action=action)
    return notice


def read_imds(instance: vpc.Instance, path: str) -> str:
    """One IMDSv2 read from inside the instance, as any process on it would make it."""
    script = (
        "import sys, urllib.request as u\n"
        "base = 'http://169.254.169.254/latest/'\n"
        "token = u.urlopen(u.Request(base + 'api/token', method='PUT',"
        " headers={'X-aws-ec2-metadata-token-ttl-seconds': '60'}), timeout=5).read().decode()\n"
        "print(u.urlopen(u.Request(base + 'meta-data/' + sys.argv[1],"
        " headers={'X-aws-ec2-metadata-token': token}), timeout=5).read().decode())\n"
    )
    return instance.ns.run(vpc.PYTHON, "-c", script, path).stdout.strip()


def stop(lab: vpc.Lab, instance: vpc.Instance) -> None:
    """EC2 stops the interrupted instance: its processes end and its link goes dark."""
    instance.ns.kill_all()
    lab.router.ip("link", "set", instance.port, "down")
    lab.in_internet(lambda: lab.ec2().stop_instances(InstanceIds=[instance.instance_id]))
    lab.event("stopped", instance=instance.instance_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args()
    while True:
        threading.Thread(target=probe.attempt, args=(args.address, args.port, args.log), daemon=True).start()
        time.sleep(INTERVAL)


if __name__ == "__main__":
    main()
