"""The heal under each egress strategy (docs/lab.md, "Strategies"): policy-route (the default),
main-table, ipv6 (direct + dual-stack) and interface-endpoints (direct). Each ends with the client in
the internet reaching the service at the Elastic IP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab import vpc

pytestmark = pytest.mark.root

TABLE = "57776"  # policy-route's private table (0xe1b0)
MAIN = 254  # the main table's id
# How often the main table is read from outside during a policy-route run.
SAMPLE_SECONDS = 0.01


def sources(calls: list[dict[str, object]], instance: vpc.Instance, key: str = "access_key") -> set[object]:
    """Source addresses of the EC2 calls the instance made (its access key names it)."""
    return {c["src"] for c in calls if c.get(key) == instance.access_key_id}


def reported_from(lab: vpc.Lab, instance: vpc.Instance) -> set[object]:
    """Source addresses of the CompleteLifecycleAction and SignalResource calls for the instance."""
    return {c["src"] for c in lab.lifecycle_calls() if c.get("InstanceId") == instance.instance_id} | {
        c["src"] for c in lab.signal_calls() if c.get("UniqueId") == instance.instance_id
    }


def _canonical(messages: Any) -> tuple[tuple[Any, ...], ...]:
    """Netlink route or rule messages as comparable values: every header field and attribute."""
    fields = ("family", "dst_len", "src_len", "tos", "table", "proto", "scope", "type", "flags", "action")
    return tuple(
        (tuple(m.get(f) for f in fields), tuple(sorted((str(k), str(v)) for k, v in m["attrs"])))
        for m in messages
    )


@contextlib.contextmanager
def sampling(instance: vpc.Instance) -> Iterator[tuple[Any, list[Any], list[Any]]]:
    """(the main table now, then its samples, and the rules' samples), read from outside the payload every
    SAMPLE_SECONDS while the block runs: one netlink socket in the instance's namespace, a dump each
    (about a millisecond, so the sampling hardly slows the run it watches)."""
    from pyroute2 import IPRoute

    tables: list[Any] = []
    rules: list[Any] = []
    stop = threading.Event()
    with IPRoute(netns=instance.ns.name) as ipr:

        def main() -> Any:
            return _canonical(ipr.route("dump", family=socket.AF_INET, table=MAIN))

        def sample() -> None:
            while not stop.is_set():
                tables.append(main())
                rules.append(_canonical(ipr.get_rules(family=socket.AF_INET)))
                stop.wait(SAMPLE_SECONDS)

        first = main()
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield first, tables, rules
        finally:
            stop.set()
            thread.join(5)


def test_policy_route_heals_and_never_changes_the_main_table(lab: vpc.Lab) -> None:
    instance = lab.boot(0, strategy=vpc.POLICY_ROUTE)
    assert instance.config()["egress"] == vpc.POLICY_ROUTE  # as synthesized for nat-instances
    before = instance.host_state()
    with instance.route_events() as events, sampling(instance) as (main, tables, rules):
        run = instance.run_payload()
    assert run.returncode == 0, run.stderr
    # Sampled from outside all through the run: the main table never changed...
    assert len(tables) > 10 and all(t == main for t in tables), run.stderr
    # ...while the rule into the private table was in place (the strategy was at work)...
    assert any(("FRA_TABLE", TABLE) in attrs for sample in rules for _, attrs in sample), rules
    # ...and every route the kernel announced was in the private table, none in the main one.
    assert events and all(f"table {TABLE}" in e for e in events), events
    print(f"main table sampled {len(tables)} times during a {run.seconds:.2f} s run: never changed")
    assert instance.host_state() == before
    # The API calls went out through the AZ's NAT; the client reaches the service at the Elastic IP.
    assert sources(lab.ec2_calls(), instance) == {vpc.nat_uplink_ip(0)}, run.stderr
    assert lab.holder() == instance.instance_id
    assert lab.client_get() == instance.instance_id


def test_main_table_heals_through_the_main_tables_default_route(lab: vpc.Lab) -> None:
    instance = lab.boot(1, strategy=vpc.MAIN_TABLE)
    assert instance.config()["egress"] == vpc.MAIN_TABLE
    before = instance.host_state()
    with instance.route_events() as events:
        run = instance.run_payload()
    assert run.returncode == 0, run.stderr
    nat = str(instance.subnet.nat_ip)
    assert any(e.startswith(f"default via {nat}") for e in events), events  # the detour in the main table
    assert instance.host_state() == before, run.stderr
    assert sources(lab.ec2_calls(), instance) == {vpc.nat_uplink_ip(1)}, run.stderr
    assert lab.holder() == instance.instance_id
    assert lab.client_get() == instance.instance_id


def test_policy_route_sigkill_mid_claim_then_the_next_run_heals(lab: vpc.Lab) -> None:
    instance = lab.boot(0)
    before, main = instance.host_state(), instance.main_table()
    # Hold the first API call so the run sits mid-claim, its rule and table in place, when it is killed.
    lab.set_api_faults(delay={"DescribeAddresses": 30})
    running = instance.start_payload()
    vpc.wait_for(lambda: f"lookup {TABLE}" in instance.rules(), "the policy rule", timeout=20)
    os.killpg(running.proc.pid, signal.SIGKILL)
    killed = instance.finish(running)
    assert killed.returncode == -signal.SIGKILL
    # The kill left the rule and the private table (they match nothing now: no socket carries the mark),
    # and the main table as it was.
    assert f"lookup {TABLE}" in instance.rules()
    assert instance.ns.ip("-4", "route", "show", "table", TABLE).strip()
    assert instance.main_table() == main
    lab.set_api_faults()
    run = instance.run_payload()
    assert run.returncode == 0, run.stderr
    assert f"recover: a previous run left rule 100 and table {TABLE}" in run.stderr
    assert instance.host_state() == before, run.stderr  # the rule and the table are gone
    assert lab.holder() == instance.instance_id
    assert lab.client_get() == instance.instance_id


@pytest.mark.parametrize("az", [0, 1])
def test_ipv6_heals_over_ipv6_without_a_nat(lab: vpc.Lab, az: int) -> None:
    # No NAT instance is needed: both are down for the whole run.
    lab.set_nat_down(0)
    lab.set_nat_down(1)
    instance = lab.boot(az, strategy=vpc.IPV6)
    config = instance.config()
    assert (config["egress"], config["dualstack"], "nat_by_subnet" in config) == ("direct", True, False)
    before = instance.host_state()
    with instance.route_events() as events:
        run = instance.run_payload()
    assert run.returncode == 0, run.stderr
    assert not events, events  # nothing on the host changed, not even for a moment
    assert instance.host_state() == before
    # EC2 heard the instance itself, over IPv6; the reports went out over the Elastic IP afterwards.
    assert sources(lab.ec2_calls(), instance) == {instance.ipv6}, run.stderr
    assert reported_from(lab, instance) == {vpc.EIP}, run.stderr
    assert lab.holder() == instance.instance_id
    assert lab.client_get() == instance.instance_id  # over IPv4, through the gateway's 1:1 NAT


def test_ipv6_with_an_ec2_endpoint_without_ipv6_exits_75_at_once(lab: vpc.Lab) -> None:
    instance = lab.boot(0, strategy=vpc.IPV6)
    before = instance.host_state()
    run = instance.run_payload(config={"ec2_endpoint_url": vpc.EC2_URL})  # an IPv4 literal
    assert run.returncode == 75, run.stderr
    assert "the dual-stack EC2 endpoint 198.51.100.254 has no IPv6 address" in run.stderr
    # Found out at once, before any API call: the first line after "no route change" is the failure
    # (the ABANDON and FAILURE attempts that follow go to IPv4-only endpoints and cannot arrive; they
    # end at their connect timeouts, inside the deadline).
    after = [t for t, line in run.lines if "WARNING" in line or "ERROR" in line]
    assert after and after[0] - run.started < 2.0, run.stderr
    assert run.seconds < vpc.LAB_DEADLINE_SECONDS, run.stderr
    assert not sources(lab.ec2_calls(), instance)
    assert instance.host_state() == before
    assert lab.holder() is None
    assert lab.client_get(timeout=0.5) is None


@pytest.mark.parametrize("az", [0, 1])
def test_interface_endpoints_heal_inside_the_vpc_without_a_nat(lab: vpc.Lab, az: int) -> None:
    lab.set_nat_down(0)
    lab.set_nat_down(1)
    instance = lab.boot(az, strategy=vpc.INTERFACE_ENDPOINTS)
    config = instance.config()
    assert (config["egress"], "dualstack" in config, "nat_by_subnet" in config) == ("direct", False, False)
    assert config["ec2_endpoint_url"] == f"http://{vpc.endpoint_ip(instance.subnet)}:8080"
    before = instance.host_state()
    with instance.route_events() as events:
        run = instance.run_payload()
    assert run.returncode == 0, run.stderr
    assert not events, events
    assert instance.host_state() == before
    # Every call reached the services through the endpoint in the VPC...
    assert sources(lab.ec2_calls(), instance) == {vpc.ENDPOINT_UPLINK_IP}, run.stderr
    assert reported_from(lab, instance) == {vpc.ENDPOINT_UPLINK_IP}, run.stderr
    # ...and none tried the internet gateway.
    api_ports = set(vpc.API_PORTS)
    assert not [a for a in lab.egress_attempts() if a[0] == instance.private_ip and a[1] in api_ports]
    assert lab.holder() == instance.instance_id
    assert lab.client_get() == instance.instance_id
