"""Failover in the VPC lab: a warm pool's instance (into the pool, then into service), the watchdog's
report of a dead service, and the yield rule when a stopped instance is started again.

moto keeps an instance's LaunchTime across stop/start (EC2 sets it to the last start), so an instance
meant to be "started later" than the holder is launched in a later second (`launched_after`): its
LaunchTime then says what EC2's would after the start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from typing import Any

import pytest

from tests.lab import vpc

pytestmark = pytest.mark.root

NAT_UPLINKS = [vpc.nat_uplink_ip(0), vpc.nat_uplink_ip(1)]
TEMPLATE_ID_TAG = "aws:ec2launchtemplate:id"
TEMPLATE_VERSION_TAG = "aws:ec2launchtemplate:version"
# The group's one launch template: versions compare only within it.
TEMPLATE_ID = "lt-0123456789abcdef0"


def lifecycle_results(lab: vpc.Lab, instance: vpc.Instance) -> list[tuple[object, object, object]]:
    """(result, source address, HTTP status) of every CompleteLifecycleAction for the instance."""
    return [
        (c["LifecycleActionResult"], c["src"], c["status"])
        for c in lab.lifecycle_calls()
        if c.get("InstanceId") == instance.instance_id
    ]


def associations_by(lab: vpc.Lab, instance: vpc.Instance) -> list[dict[str, Any]]:
    return [
        c
        for c in lab.ec2_calls()
        if c["access_key"] == instance.access_key_id and c["action"] == "AssociateAddress"
    ]


def heal(lab: vpc.Lab, instance: vpc.Instance) -> vpc.PayloadRun:
    before = instance.routes()
    run = instance.run_payload()
    assert run.returncode == 0, run.stderr
    assert instance.routes() == before, run.stderr
    assert lab.client_get() == instance.instance_id, run.stderr
    return run


def tag_version(lab: vpc.Lab, instance: vpc.Instance, version: int) -> None:
    """EC2's reserved tags: the launch template and its version the instance was launched from
    (aws-facts: payload-launch-template-tags)."""
    tags = [
        {"Key": TEMPLATE_ID_TAG, "Value": TEMPLATE_ID},
        {"Key": TEMPLATE_VERSION_TAG, "Value": str(version)},
    ]
    lab.in_internet(lambda: lab.ec2().create_tags(Resources=[instance.instance_id], Tags=tags))


def warm_up(lab: vpc.Lab, instance: vpc.Instance, state: str = "Warmed:Stopped") -> vpc.PayloadRun:
    """The first boot of an instance launched into the warm pool: the payload only CONTINUEs."""
    lab.set_target_lifecycle_state(instance, state)
    before = instance.routes()
    run = instance.run_payload()
    assert run.returncode == 0, run.stderr
    assert instance.routes() == before, run.stderr
    return run


def leave_the_pool(lab: vpc.Lab, instance: vpc.Instance) -> None:
    """Auto Scaling stops the warmed instance, later starts it for service: /run is empty again (a
    tmpfs), IMDS says InService, and the launch hook holds it a second time."""
    lab.in_internet(lambda: lab.ec2().stop_instances(InstanceIds=[instance.instance_id]))
    shutil.rmtree(instance.state_dir)
    instance.state_dir.mkdir()
    lab.set_target_lifecycle_state(instance, "InService")
    lab.open_lifecycle_action(instance)
    lab.in_internet(lambda: lab.ec2().start_instances(InstanceIds=[instance.instance_id]))


@pytest.mark.parametrize("state", ["Warmed:Running", "Warmed:Stopped"])
def test_warming_for_the_pool_takes_nothing_then_service_takes_the_address(lab: vpc.Lab, state: str) -> None:
    instance = lab.boot(0)
    run = warm_up(lab, instance, state)
    # Into the pool: no claim, the address and the routes untouched, the client reaches nothing...
    assert lab.holder() is None, run.stderr
    assert not associations_by(lab, instance), run.stderr
    assert lab.client_get(timeout=0.5) is None
    # ...and the launch action completed, through the detour (the NAT's uplink), with no signal.
    assert lifecycle_results(lab, instance) == [("CONTINUE", NAT_UPLINKS[0], 200)], run.stderr
    assert not [c for c in lab.signal_calls() if c.get("UniqueId") == instance.instance_id]

    leave_the_pool(lab, instance)
    run = heal(lab, instance)
    # Out of the pool: it takes the address; the second launch action is completed as well.
    assert lab.holder() == instance.instance_id
    assert len(associations_by(lab, instance)) == 1
    assert lifecycle_results(lab, instance) == [
        ("CONTINUE", NAT_UPLINKS[0], 200),
        ("CONTINUE", NAT_UPLINKS[0], 200),
    ], run.stderr
    assert [c["Status"] for c in lab.signal_calls() if c.get("UniqueId") == instance.instance_id] == [
        "SUCCESS"
    ]


def with_health_check(instance: vpc.Instance, check: dict[str, Any]) -> None:
    """The configuration the user data writes for a service with a health_check."""
    config = json.loads(instance.config_path.read_text())
    config["health_check"] = check
    instance.config_path.write_text(json.dumps(config, indent=2))


def run_watchdog(instance: vpc.Instance) -> subprocess.CompletedProcess[str]:
    """One tick of eip-reclaim-watchdog.timer: the real watchdog, in the instance's namespace."""
    argv = [vpc.PYTHON, "-m", "bootstrap.watchdog", "--config", str(instance.config_path)]
    return subprocess.run(
        instance.ns.argv(argv),
        cwd=vpc.REPO,
        env=instance.payload_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def kill_the_service(instance: vpc.Instance) -> None:
    """The service process dies; the instance itself stays up (EC2's status checks see nothing)."""
    pids = subprocess.run(
        ["ip", "netns", "pids", instance.ns.name], capture_output=True, text=True, check=True
    ).stdout.split()
    killed = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read().split(b"\0")
        except OSError:
            continue
        if b"tests.lab.service" in cmdline:
            os.kill(int(pid), signal.SIGKILL)
            killed += 1
    assert killed == 1


def test_the_watchdog_reports_a_dead_service_and_a_replacement_heals(lab: vpc.Lab) -> None:
    holder = lab.boot(0)
    with_health_check(holder, {"port": 80, "path": "/", "failures": 3, "grace_seconds": 0})
    heal(lab, holder)
    # A healthy service: the tick probes and reports nothing.
    tick = run_watchdog(holder)
    assert tick.returncode == 0 and not lab.health_calls(), tick.stderr

    kill_the_service(holder)
    assert lab.client_get(timeout=0.5) is None  # the outage the watchdog ends
    for _ in range(2):
        tick = run_watchdog(holder)
        assert tick.returncode == 0, tick.stderr
    assert not lab.health_calls(), tick.stderr  # two failures in a row: not yet
    tick = run_watchdog(holder)
    assert tick.returncode == 0, tick.stderr
    (call,) = lab.health_calls()
    # Unhealthy for its own instance, respecting the group's grace period, over its Elastic IP.
    assert (call["InstanceId"], call["HealthStatus"], call["ShouldRespectGracePeriod"]) == (
        holder.instance_id,
        "Unhealthy",
        "true",
    ), tick.stderr
    assert call["src"] == vpc.EIP
    # Reported once: the next ticks wait for the replacement.
    run_watchdog(holder)
    assert len(lab.health_calls()) == 1

    # Auto Scaling terminates it and launches a replacement, which takes the address.
    lab.kill(holder)
    replacement = lab.boot(1)
    heal(lab, replacement)
    assert lab.holder() == replacement.instance_id


@pytest.mark.parametrize(
    ("version", "takes"),
    [pytest.param(2, True, id="same-version-takes"), pytest.param(1, False, id="older-version-yields")],
)
def test_a_pool_instance_started_later_takes_the_address_only_if_not_older(
    lab: vpc.Lab, version: int, takes: bool
) -> None:
    holder = lab.boot(0)
    tag_version(lab, holder, 2)
    heal(lab, holder)
    # Warmed before or after the holder's update (its template version), started after it.
    started = lab.boot(1, launched_after=time.time())
    tag_version(lab, started, version)
    warm_up(lab, started)
    leave_the_pool(lab, started)
    before = started.routes()
    run = started.run_payload()
    assert run.returncode == 0, run.stderr
    assert started.routes() == before, run.stderr
    if takes:
        # Same version, later start: the instance Auto Scaling just put in service wins.
        assert lab.holder() == started.instance_id, run.stderr
        assert lab.client_get() == started.instance_id
    else:
        # A stale pool instance never takes the address from a member of a newer template version.
        assert "yielding to newer instance" in run.stderr
        assert lab.holder() == holder.instance_id, run.stderr
        assert not associations_by(lab, started)
        assert lab.client_get() == holder.instance_id
