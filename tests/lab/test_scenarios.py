"""The heal, end to end in the VPC lab: the real payload, real routing, a real NAT, the EC2 API over HTTP.

Each scenario asserts what a user cares about (the client in the internet reaches the service at the
Elastic IP, or does not), that the instance's routing tables are exactly as before, and the exit code.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.lab import vpc

pytestmark = pytest.mark.root

NAT_UPLINKS = [vpc.nat_uplink_ip(0), vpc.nat_uplink_ip(1)]


def calls_by(lab: vpc.Lab, instance: vpc.Instance, action: str | None = None) -> list[dict[str, object]]:
    return [
        c
        for c in lab.ec2_calls()
        if c["access_key"] == instance.access_key_id and (action is None or c["action"] == action)
    ]


def lifecycle_results(lab: vpc.Lab, instance: vpc.Instance) -> list[tuple[object, object]]:
    """(result, source address) of every CompleteLifecycleAction the stand-in received for the instance."""
    return [
        (c["LifecycleActionResult"], c["src"])
        for c in lab.lifecycle_calls()
        if c.get("InstanceId") == instance.instance_id
    ]


# The scenarios that test the main-table detour's own mechanics (pins, the journal of the main
# table's default route, a DHCP client rewriting it) run with this per-run override; the rest run the
# payload's default, policy-route, as the synthesized configuration carries it.
MAIN_TABLE = {"egress": vpc.MAIN_TABLE}


def heal(lab: vpc.Lab, instance: vpc.Instance) -> vpc.PayloadRun:
    before = instance.host_state()
    run = instance.run_payload()
    assert run.returncode == 0, run.stderr
    assert instance.host_state() == before, run.stderr
    assert lab.client_get() == instance.instance_id
    return run


def test_the_gateway_forwards_only_for_the_holder(lab: vpc.Lab) -> None:
    """Before any heal, the instance is unreachable at the Elastic IP and cannot reach the API itself."""
    instance = lab.boot(0)
    assert lab.client_get(timeout=0.5) is None
    connect = f"import socket; socket.create_connection(('{vpc.INTERNET_IP}', 8080), timeout=1)"
    reach = instance.ns.run(vpc.PYTHON, "-c", connect, check=False)
    assert reach.returncode != 0, reach.stdout  # no public address, no way out: the reason for the detour
    assert "timed out" in reach.stderr  # dropped by the gateway, not refused by anyone
    assert (instance.private_ip, 8080) in lab.egress_attempts()


IMDS_CLIENT = """
import sys, urllib.request, urllib.error
base = "http://169.254.169.254/latest/"
try:
    urllib.request.urlopen(base + "meta-data/instance-id", timeout=2)
except urllib.error.HTTPError as e:
    print(e.code)
put = urllib.request.Request(base + "api/token", method="PUT",
                             headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
token = urllib.request.urlopen(put, timeout=2).read().decode()
get = urllib.request.Request(base + "meta-data/instance-id", headers={"X-aws-ec2-metadata-token": token})
print(urllib.request.urlopen(get, timeout=2).read().decode())
"""


def test_the_imds_is_v2_only_and_answers_by_source(lab: vpc.Lab) -> None:
    first, second = lab.boot(0), lab.boot(1)
    for instance in (first, second):
        answer = instance.ns.run(vpc.PYTHON, "-c", IMDS_CLIENT).stdout.split()
        assert answer == ["401", instance.instance_id]


def test_1_first_boot_takes_the_address(lab: vpc.Lab) -> None:
    instance = lab.boot(0)
    run = heal(lab, instance)
    assert lab.holder() == instance.instance_id
    # The API saw this instance through its own AZ's NAT, never directly.
    sources = {c["src"] for c in calls_by(lab, instance)}
    assert sources == {NAT_UPLINKS[0]}, run.stderr
    assert len(calls_by(lab, instance, "AssociateAddress")) == 1
    # CONTINUE went out through the detour, before the restore (the payload reports while the NAT
    # still carries its connections).
    assert lifecycle_results(lab, instance) == [("CONTINUE", NAT_UPLINKS[0])]
    # ...for the group and hook that the synthesized user data names.
    (call,) = lab.lifecycle_calls()
    hook = lab.spec.config["lifecycle_hook"]
    assert (call["AutoScalingGroupName"], call["LifecycleHookName"]) == (lab.asg_name, hook["hook"])
    # The deploy that launched it hears SUCCESS for the group the synthesized config names...
    signal = lab.spec.config["signal"]
    assert [
        (c["StackName"], c["LogicalResourceId"], c["Status"], c["status"])
        for c in lab.signal_calls()
        if c.get("UniqueId") == instance.instance_id
    ] == [(signal["stack"], signal["resource"], "SUCCESS", 200)]
    # ...and the dashboard gets one heal, with its time, for this service.
    published = {
        m["MetricName"]: m
        for c in lab.metric_calls()
        if c.get("Namespace") == lab.spec.config["metrics"]["namespace"]
        for m in c["MetricData"]
    }
    assert published["Healed"]["Value"] == 1 and published["HealSeconds"]["Value"] > 0, run.stderr
    assert "Abandoned" not in published
    # Every metadata request went to the VPC's IMDS; the NAT's never heard from the instance.
    assert any(r["src"] == instance.private_ip for r in lab.imds_log("router"))
    assert not [r for r in lab.imds_log("nat0") if r["src"] == instance.private_ip]


def test_2_replacement_in_the_other_az_takes_over(lab: vpc.Lab) -> None:
    first = lab.boot(0)
    heal(lab, first)
    lab.kill(first)
    assert lab.client_get(timeout=0.5) is None  # the outage the replacement ends
    replacement = lab.boot(1)
    heal(lab, replacement)
    assert lab.holder() == replacement.instance_id
    # The address moved while still associated with the dead instance: AllowReassociation did it,
    # through the replacement's own AZ's NAT.
    assert {c["src"] for c in calls_by(lab, replacement)} == {NAT_UPLINKS[1]}
    assert len(calls_by(lab, replacement, "AssociateAddress")) == 1
    assert lifecycle_results(lab, replacement) == [("CONTINUE", NAT_UPLINKS[1])]


def test_3_reboot_of_the_holder_changes_nothing(lab: vpc.Lab) -> None:
    instance = lab.boot(0)
    heal(lab, instance)
    calls_before = len(lab.ec2_calls())
    before = instance.routes()
    with instance.route_events() as route_events:
        run = instance.run_payload()
    assert run.returncode == 0, run.stderr
    assert route_events == [], f"routes changed during a reboot run: {route_events}"
    assert instance.routes() == before
    new_calls = lab.ec2_calls()[calls_before:]
    assert not [c for c in new_calls if c["action"] == "AssociateAddress"]
    # Whatever it asked went out through its Elastic IP, not through a NAT.
    assert {c["src"] for c in new_calls} <= {vpc.EIP}
    assert lab.client_get() == instance.instance_id


def nat_down_boot(lab: vpc.Lab) -> tuple[vpc.Instance, str, vpc.PayloadRun]:
    lab.set_nat_down(0)
    instance = lab.boot(0)
    before = instance.routes()
    return instance, before, instance.run_payload()


def test_4_nat_down_fails_bounded_and_restores(lab: vpc.Lab) -> None:
    instance, before, run = nat_down_boot(lab)
    assert run.returncode == 75, run.stderr
    assert run.seconds < vpc.LAB_DEADLINE_SECONDS + 5, run.stderr  # bounded by the deadline, not hung
    assert instance.routes() == before, run.stderr
    assert lab.holder() is None
    assert lab.client_get(timeout=0.5) is None
    assert lifecycle_results(lab, instance) == []


def test_4_nat_down_still_attempts_abandon(lab: vpc.Lab) -> None:
    """ABANDON is attempted through the detour, the only way out an instance without an address has;
    with the NAT down it cannot arrive (the hook's own default ABANDON covers that), and it is not
    tried again through the router, which would drop it."""
    instance, _before, run = nat_down_boot(lab)
    assert run.returncode == 75, run.stderr
    # With the lab's 30 s hook window no restarted run fits: this run's failure is final.
    assert "lifecycle: no time left in the hook's window for another attempt; abandoning" in run.stderr
    lines = run.stderr.splitlines()
    assert any("report: ABANDON through the detour: not sent" in line for line in lines), run.stderr
    # The stack's FAILURE signal is attempted the same way, and cannot arrive either.
    assert any("report: FAILURE signal through the detour: not sent" in line for line in lines), run.stderr
    assert lifecycle_results(lab, instance) == []
    assert not lab.signal_calls()
    assert (instance.private_ip, 8081) not in lab.egress_attempts(), run.stderr
    assert (instance.private_ip, 8082) not in lab.egress_attempts(), run.stderr


def test_5_missing_imds_pin_is_caught_by_the_guard(lab: vpc.Lab) -> None:
    """Without the pin, IMDS requests ride the detour to the NAT, whose own IMDS answers: the bug."""
    instance = lab.boot(0)
    before = instance.routes()
    run = instance.run_payload(env={"EIP_RECLAIM_TEST_SKIP_PINS": "imds"}, config=MAIN_TABLE)
    assert run.returncode == 75, run.stderr
    nat_heard = [r for r in lab.imds_log("nat0") if r["src"] == instance.private_ip]
    assert any("instance-id" in str(r["path"]) and r["status"] == 200 for r in nat_heard), run.stderr
    assert lab.nat_ids[0] in run.stderr  # the guard names the identity it was handed
    assert instance.routes() == before
    assert lab.holder() is None
    assert not calls_by(lab, instance, "AssociateAddress")
    assert lab.client_get(timeout=0.5) is None


def test_6_sigkill_mid_detour_then_the_next_run_heals(lab: vpc.Lab) -> None:
    instance = lab.boot(0)
    before = instance.routes()
    # Hold the first API call so the run sits in the detour long enough to be killed there.
    lab.set_api_faults(delay={"DescribeAddresses": 30})
    running = instance.start_payload(config=MAIN_TABLE)
    nat = str(instance.subnet.nat_ip)
    vpc.wait_for(lambda: f"via {nat}" in instance.default_route(), "the detour", timeout=20)
    os.killpg(running.proc.pid, signal.SIGKILL)
    killed = instance.finish(running)
    assert killed.returncode == -signal.SIGKILL
    assert f"via {nat}" in instance.default_route()  # the kill left the detour in place
    lab.set_api_faults()
    run = instance.run_payload(config=MAIN_TABLE)
    assert run.returncode == 0, run.stderr
    assert "recover: a previous run left a detour via" in run.stderr
    assert instance.routes() == before, run.stderr
    assert lab.client_get() == instance.instance_id
    assert lab.holder() == instance.instance_id


def test_7_throttling_is_retried(lab: vpc.Lab) -> None:
    lab.set_api_faults(throttle_first=3)
    instance = lab.boot(0)
    run = heal(lab, instance)
    throttled = [c for c in lab.ec2_calls() if c.get("fault") == "throttle"]
    assert len(throttled) == 3, run.stderr
    assert lab.holder() == instance.instance_id
    assert lifecycle_results(lab, instance) == [("CONTINUE", NAT_UPLINKS[0])]


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param({"error_first": 3, "status": 500}, id="errors"),
        pytest.param({"error_first": 2, "status": 503, "delay": 0.2}, id="errors-and-slowness"),
    ],
)
def test_8_imds_errors_and_slowness(lab: vpc.Lab, faults: dict[str, object]) -> None:
    lab.set_imds_faults(**faults)
    instance = lab.boot(0)
    run = heal(lab, instance)
    assert [r["status"] for r in lab.imds_log("router")][: int(str(faults["error_first"]))] == [
        faults["status"]
    ] * int(str(faults["error_first"])), run.stderr
    assert lab.holder() == instance.instance_id


def test_9_unauthorized_fails_fast_with_3(lab: vpc.Lab) -> None:
    lab.set_api_faults(unauthorized=["AssociateAddress"])
    instance = lab.boot(0)
    before = instance.routes()
    run = instance.run_payload()
    assert run.returncode == 3, run.stderr
    assert run.seconds < vpc.LAB_DEADLINE_SECONDS, run.stderr  # permanent: no retrying to the deadline
    assert len(calls_by(lab, instance, "AssociateAddress")) == 1
    assert instance.routes() == before
    assert lab.holder() is None
    assert lab.client_get(timeout=0.5) is None
    # ABANDON went out through the detour (from the NAT's address), so the group replaces the
    # instance at once instead of waiting out the hook.
    assert lifecycle_results(lab, instance) == [("ABANDON", vpc.nat_uplink_ip(0))], run.stderr
    # A deploy waiting for this instance fails now instead of at its timeout, and the alarm on the
    # payload's Abandoned metric tells the team.
    assert [c["Status"] for c in lab.signal_calls() if c.get("UniqueId") == instance.instance_id] == [
        "FAILURE"
    ], run.stderr
    abandoned = [
        m for c in lab.metric_calls() for m in c.get("MetricData", []) if m["MetricName"] == "Abandoned"
    ]
    assert [m["Value"] for m in abandoned] == [1], run.stderr


def test_10_elastic_ip_gone_fails_with_3(lab: vpc.Lab) -> None:
    lab.release_eip()
    instance = lab.boot(0)
    before = instance.routes()
    run = instance.run_payload()
    assert run.returncode == 3, run.stderr
    assert run.seconds < vpc.LAB_DEADLINE_SECONDS, run.stderr
    assert not calls_by(lab, instance, "AssociateAddress")
    assert instance.routes() == before
    assert lab.client_get(timeout=0.5) is None


def test_11_overlap_during_a_refresh_the_newer_keeps_it(lab: vpc.Lab) -> None:
    older = lab.boot(0)
    heal(lab, older)
    newer = lab.boot(1, launched_after=time.time())
    heal(lab, newer)
    # The older instance's timer fires while both run: it must yield, not take the address back.
    before = older.routes()
    run = older.run_payload()
    assert run.returncode == 0, run.stderr
    assert older.routes() == before
    assert len(calls_by(lab, older, "AssociateAddress")) == 1  # only its own first heal
    assert lab.holder() == newer.instance_id
    assert lab.client_get() == newer.instance_id


def test_the_gateway_follows_moto_without_the_proxy(lab: vpc.Lab) -> None:
    """Associations made behind the proxy's back reach the gateway by its 50 ms poll alone."""
    instance = lab.boot(0)
    lab.in_internet(
        lambda: lab.ec2().associate_address(AllocationId=lab.allocation_id, InstanceId=instance.instance_id)
    )
    vpc.wait_for(lambda: lab.client_get(timeout=0.5) == instance.instance_id, "forwarding", timeout=5)
    association = lab.in_internet(lambda: lab.ec2().describe_addresses(PublicIps=[vpc.EIP]))["Addresses"][0]
    lab.in_internet(lambda: lab.ec2().disassociate_address(AssociationId=association["AssociationId"]))
    vpc.wait_for(lambda: lab.client_get(timeout=0.3) is None, "forwarding to stop", timeout=5)


def test_lease_renewal_during_the_detour_is_undone_and_restored(lab: vpc.Lab) -> None:
    """systemd-networkd puts its DHCP default route back on a lease renewal, in the middle of a detour;
    the run re-asserts the detour, heals, and leaves exactly the original routes."""
    instance = lab.boot(0)
    before = instance.routes()
    lab.set_api_faults(delay={"DescribeAddresses": 1.0})
    running = instance.start_payload(config=MAIN_TABLE)
    nat = str(instance.subnet.nat_ip)
    vpc.wait_for(lambda: f"via {nat}" in instance.default_route(), "the detour", timeout=20)
    router = str(instance.subnet.router_ip)
    # What networkd does on renewal: its own default route, same metric, replacing the detour.
    instance.ns.ip(
        "route", "replace", "default", "via", router, "dev", "ens5", "proto", "dhcp",
        "src", instance.private_ip, "metric", vpc.DHCP_METRIC,
    )  # fmt: skip
    run = instance.finish(running)
    assert run.returncode == 0, run.stderr
    assert instance.routes() == before, run.stderr
    assert lab.client_get() == instance.instance_id
