"""Small fakes for the payload's injected dependencies (clock, IMDS, netlink, EC2), and their own checks.

The netlink fake follows the kernel's IPv4 rules that the payload relies on: a route's key is
(table, dst, metric), and the routes of one key form an ordered group; `add` of an existing key fails
with EEXIST; `append` adds after the group unless an identical route is in it (EEXIST); `replace` swaps
the group's first route (or adds one), is a no-op when that first route is identical, and fails with
EEXIST when an identical route is further down the group; `del` matches the attributes given and fails
with ESRCH when none matches. tests/kernel runs the same operations against the real kernel.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
from botocore.exceptions import ClientError

from bootstrap import reclaim, routes
from bootstrap.imds import Credentials, Identity, ImdsError
from bootstrap.route_model import PathLookup, Route, RouteError, Rule
from bootstrap.state import Journal

SELF = "i-0123456789abcdef0"
OTHER = "i-0fedcba9876543210"
MAC = "02:00:0a:00:00:0a"
ALLOCATION = "eipalloc-0123456789abcdef0"
EIP = "198.51.100.7"
IFINDEX = 7
SUBNET = "subnet-0aaa"

DHCP_DEFAULT = Route(
    dst="0.0.0.0/0", gateway="10.0.0.1", oif=IFINDEX, priority=512, proto=16, prefsrc="10.0.0.10"
)
AL2023_TABLE = [
    DHCP_DEFAULT,
    Route(dst="10.0.0.0/24", oif=IFINDEX, priority=512, proto=2, scope=253, prefsrc="10.0.0.10"),
    Route(dst="10.0.0.1/32", oif=IFINDEX, priority=512, proto=16, scope=253, prefsrc="10.0.0.10"),
    Route(dst="10.0.0.2/32", gateway="10.0.0.1", oif=IFINDEX, priority=512, proto=16, prefsrc="10.0.0.10"),
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        # Ten minutes after boot by default: past the first boot's grace for IAM and credentials.
        self.boot = self.now - 600.0

    def monotonic(self) -> float:
        return self.now

    def uptime(self) -> float:
        return self.now - self.boot

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _key(route: Route) -> tuple[int, str, int]:
    return (route.table, route.dst, route.priority)


class _FakeNetlinkError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def route_failure(command: str, route: Route, code: int) -> RouteError:
    err = RouteError(f"routes: {command} {route.describe()}: errno {code}")
    err.__cause__ = _FakeNetlinkError(code)
    return err


class FakeNetlink:
    """The main table as a list; `calls` records every change, `fail_on` makes one operation fail."""

    def __init__(self, table: list[Route] | None = None, links: dict[str, int] | None = None) -> None:
        self.table = list(AL2023_TABLE if table is None else table)
        self.links = {MAC: IFINDEX} if links is None else links
        self.interface_addresses: dict[int, list[str]] = {IFINDEX: ["10.0.0.10/24"]}
        # The kernel's three rules of a fresh namespace; tests add theirs.
        self.rule_list: list[Rule] = [Rule(0, 255), Rule(32766, 254), Rule(32767, 253)]
        self.calls: list[tuple[str, Route]] = []
        self.rule_calls: list[tuple[str, Rule]] = []
        self.fail_on: dict[str, int] = {}
        self.on_change: Callable[[str, Route], None] = lambda command, route: None

    def link_index(self, mac: str) -> int | None:
        return self.links.get(mac)

    def routes(self, table: int) -> list[Route]:
        return [r for r in self.table if r.table == table]

    def addresses(self, ifindex: int) -> list[str]:
        return list(self.interface_addresses.get(ifindex, []))

    def rules(self) -> list[Rule]:
        return sorted(self.rule_list, key=lambda r: r.priority)

    def add_rule(self, rule: Rule) -> None:
        self.rule_calls.append(("add", rule))
        self.rule_list.append(rule)

    def delete_rule(self, rule: Rule) -> bool:
        self.rule_calls.append(("delete", rule))
        for i, r in enumerate(self.rule_list):
            if (r.priority, r.table, r.fwmark) == (rule.priority, rule.table, rule.fwmark):
                del self.rule_list[i]
                return True
        return False

    def route_get(self, dst: str, src: str | None = None, mark: int | None = None) -> PathLookup:
        """Rules by priority (from, fwmark, not), then the longest prefix in the rule's table."""
        for rule in self.rules():
            if rule.other or not rule.may_match(src, mark or 0):
                continue
            found = routes._longest_match(self.routes(rule.table), dst)
            if found is not None:
                return PathLookup(found.gateway, found.oif, rule.table, src or found.prefsrc)
        err = RouteError(f"routes: get {dst}: errno {errno.ENETUNREACH}")
        err.__cause__ = _FakeNetlinkError(errno.ENETUNREACH)
        raise err

    def _record(self, command: str, route: Route) -> None:
        self.calls.append((command, route))
        if command in self.fail_on:
            raise route_failure(command, route, self.fail_on[command])
        self.on_change(command, route)

    def _group(self, route: Route) -> list[int]:
        """Positions of the routes with the route's key, in the kernel's order within the group."""
        return [i for i, r in enumerate(self.table) if _key(r) == _key(route)]

    def add(self, route: Route) -> None:
        self._record("add", route)
        if self._group(route):
            raise route_failure("add", route, errno.EEXIST)
        self.table.append(route)

    def append(self, route: Route) -> None:
        self._record("append", route)
        group = self._group(route)
        if any(self.table[i] == route for i in group):
            raise route_failure("append", route, errno.EEXIST)
        self.table.insert(group[-1] + 1 if group else len(self.table), route)

    def replace(self, route: Route) -> None:
        self._record("replace", route)
        group = self._group(route)
        if not group:
            self.table.append(route)
        elif self.table[group[0]] == route:
            return
        elif any(self.table[i] == route for i in group):
            raise route_failure("replace", route, errno.EEXIST)
        else:
            self.table[group[0]] = route

    def delete(self, route: Route) -> bool:
        self._record("delete", route)
        for i, r in enumerate(self.table):
            if r == route:
                del self.table[i]
                return True
        return False

    def changes(self) -> list[tuple[str, Route]]:
        return list(self.calls)

    @contextmanager
    def open(self) -> Iterator[FakeNetlink]:
        yield self


@dataclass
class FakeImds:
    identity_value: Identity = field(
        default_factory=lambda: Identity(SELF, MAC, SUBNET, "10.0.0.0/24", ("10.0.0.0/16",), None)
    )
    # What instance-id answers after the first read (the guard's read during the detour).
    later_instance_ids: list[str] = field(default_factory=list)
    creds: Credentials | None = field(
        default_factory=lambda: Credentials("ASIAFAKE", "fake-secret-never-logged", "fake-token-never-logged")
    )
    target_state: str | None = "InService"
    fail_identity: Exception | None = None
    fail_guard: Exception | None = None
    fail_credentials: Exception | None = None
    reads: int = 0

    def identity(self) -> Identity:
        if self.fail_identity:
            raise self.fail_identity
        self.reads += 1
        return self.identity_value

    def instance_id(self) -> str:
        if self.fail_guard:
            raise self.fail_guard
        if self.later_instance_ids:
            return self.later_instance_ids.pop(0)
        return self.identity_value.instance_id

    def target_lifecycle_state(self) -> str | None:
        return self.target_state

    def credentials(self) -> Credentials | None:
        if self.fail_credentials:
            raise self.fail_credentials
        return self.creds


def client_error(code: str, status: int = 400, operation: str = "Op") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


class _Markable:
    """Where botocore keeps the socket options of a client's connections (the policy-route mark)."""

    def __init__(self) -> None:
        self._endpoint = SimpleNamespace(http_session=SimpleNamespace(_socket_options=[]))

    @property
    def socket_options(self) -> list[tuple[int, int, int]]:
        options: list[tuple[int, int, int]] = self._endpoint.http_session._socket_options
        return options


class FakeEc2(_Markable):
    """Addresses and instances in dicts; `errors[op]` are raised by the next calls of `op`, in order."""

    def __init__(self, holder: str | None = OTHER) -> None:
        super().__init__()
        self.address: dict[str, Any] = {"AllocationId": ALLOCATION, "PublicIp": EIP}
        if holder:
            self.address["InstanceId"] = holder
        self.instances: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, list[Exception]] = {}
        self.calls: list[str] = []
        self.before_call: Callable[[str], None] = lambda op: None
        self.closes = 0
        self.on_close: Callable[[], None] = lambda: None

    def _enter(self, op: str) -> None:
        self.calls.append(op)
        self.before_call(op)
        pending = self.errors.get(op)
        if pending:
            raise pending.pop(0)

    def describe_addresses(self, AllocationIds: list[str]) -> dict[str, Any]:
        self._enter("DescribeAddresses")
        if AllocationIds != [ALLOCATION]:
            raise client_error("InvalidAllocationID.NotFound")
        return {"Addresses": [dict(self.address)]}

    def describe_instances(self, Filters: list[dict[str, Any]]) -> dict[str, Any]:
        self._enter("DescribeInstances")
        ids = Filters[0]["Values"]
        found = [self.instances[i] for i in ids if i in self.instances]
        return {"Reservations": [{"Instances": found}]}

    def associate_address(
        self, AllocationId: str, InstanceId: str, AllowReassociation: bool
    ) -> dict[str, Any]:
        self._enter("AssociateAddress")
        assert AllowReassociation is True
        self.address["InstanceId"] = InstanceId
        return {"AssociationId": "eipassoc-0123"}

    def close(self) -> None:
        self.closes += 1
        self.on_close()


class FakeAutoScaling(_Markable):
    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.completed: list[dict[str, str]] = []
        self.error = error
        self.before_call: Callable[[str], None] = lambda result: None
        self.closes = 0
        self.on_close: Callable[[], None] = lambda: None

    def complete_lifecycle_action(self, **kwargs: str) -> dict[str, Any]:
        self.before_call(kwargs["LifecycleActionResult"])
        if self.error:
            raise self.error
        self.completed.append(kwargs)
        return {}

    def close(self) -> None:
        self.closes += 1
        self.on_close()


class FakeReportApi(_Markable):
    """CloudFormation's SignalResource and CloudWatch's PutMetricData: calls recorded, errors in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.errors: list[Exception] = []
        self.closes = 0

    def _call(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.errors:
            raise self.errors.pop(0)
        self.calls.append(kwargs)
        return {}

    def signal_resource(self, **kwargs: Any) -> dict[str, Any]:
        return self._call(kwargs)

    def put_metric_data(self, **kwargs: Any) -> dict[str, Any]:
        return self._call(kwargs)

    def close(self) -> None:
        self.closes += 1


class FakeClients:
    def __init__(
        self,
        ec2: FakeEc2,
        autoscaling: FakeAutoScaling | None = None,
        cloudformation: FakeReportApi | None = None,
        cloudwatch: FakeReportApi | None = None,
    ) -> None:
        self.ec2_client = ec2
        self.autoscaling_client = autoscaling or FakeAutoScaling()
        self.cloudformation_client = cloudformation or FakeReportApi()
        self.cloudwatch_client = cloudwatch or FakeReportApi()
        self.made: list[tuple[str, str | None, Credentials | None]] = []

    def ec2(
        self, endpoint_url: str | None, credentials: Credentials | None, *, dualstack: bool = False
    ) -> Any:
        self.made.append(("ec2", endpoint_url, credentials))
        return self.ec2_client

    def autoscaling(self, endpoint_url: str | None, credentials: Credentials | None) -> Any:
        self.made.append(("autoscaling", endpoint_url, credentials))
        return self.autoscaling_client

    def cloudformation(self, endpoint_url: str | None, credentials: Credentials | None) -> Any:
        self.made.append(("cloudformation", endpoint_url, credentials))
        return self.cloudformation_client

    def cloudwatch(self, endpoint_url: str | None, credentials: Credentials | None) -> Any:
        self.made.append(("cloudwatch", endpoint_url, credentials))
        return self.cloudwatch_client


@dataclass
class Rig:
    """One payload run's world of fakes, plus the config file it reads."""

    tmp: Path
    clock: FakeClock = field(default_factory=FakeClock)
    imds: FakeImds = field(default_factory=FakeImds)
    netlink: FakeNetlink = field(default_factory=FakeNetlink)
    ec2: FakeEc2 = field(default_factory=FakeEc2)
    autoscaling: FakeAutoScaling = field(default_factory=FakeAutoScaling)
    cloudformation: FakeReportApi = field(default_factory=FakeReportApi)
    cloudwatch: FakeReportApi = field(default_factory=FakeReportApi)
    skip_pins: frozenset[str] = frozenset()

    def config(self, **overrides: Any) -> str:
        document: dict[str, Any] = {
            "version": 1,
            "region": "ap-southeast-2",
            "allocation_id": ALLOCATION,
            "nat_by_subnet": {SUBNET: "10.0.0.4", "subnet-0bbb": "10.0.1.4"},
            "lifecycle_hook": {"auto_scaling_group": "svc-asg", "hook": "svc-launch"},
            "deadline_seconds": 240,
            # The tests of the run's state machine use the detour whose every step they can see in the
            # main table; tests/unit/test_bootstrap_egress.py covers the default, policy-route.
            "egress": "main-table",
        }
        document.update(overrides)
        document = {k: v for k, v in document.items() if v is not None}
        path = self.tmp / "config.json"
        path.write_text(json.dumps(document))
        return str(path)

    @property
    def journal(self) -> Journal:
        return Journal(str(self.tmp / "state"))

    def deps(self) -> reclaim.Deps:
        import random

        return reclaim.Deps(
            clock=self.clock,
            imds=self.imds,
            netlink=self.netlink.open,
            clients=FakeClients(self.ec2, self.autoscaling, self.cloudformation, self.cloudwatch),
            journal=self.journal,
            skip_pins=self.skip_pins,
            rng=random.Random(7),
        )

    def main(self, *args: str, config: str | None = None) -> int:
        from bootstrap.cli import main

        return main(["--config", config or self.config(), *args], deps=self.deps())


# The fakes' own checks: they must behave as the kernel does where the payload depends on it.


def test_fake_netlink_add_of_an_existing_key_fails_like_the_kernel() -> None:
    nl = FakeNetlink()
    with pytest.raises(RouteError) as caught:
        nl.add(replace(DHCP_DEFAULT, gateway="10.0.0.4"))
    assert getattr(caught.value.__cause__, "code", None) == errno.EEXIST


def test_fake_netlink_replace_keys_on_dst_and_metric() -> None:
    nl = FakeNetlink()
    nl.replace(replace(DHCP_DEFAULT, gateway="10.0.0.4"))
    nl.replace(replace(DHCP_DEFAULT, gateway="10.0.0.5", priority=0))
    gateways = sorted((r.priority, r.gateway) for r in nl.table if r.dst == "0.0.0.0/0")
    assert gateways == [(0, "10.0.0.5"), (512, "10.0.0.4")]


def test_fake_netlink_append_and_replace_in_a_group_like_the_kernel() -> None:
    nl = FakeNetlink()
    detour = replace(DHCP_DEFAULT, gateway="10.0.0.4")
    nl.replace(detour)
    nl.append(DHCP_DEFAULT)
    assert [r for r in nl.table if r.dst == "0.0.0.0/0"] == [detour, DHCP_DEFAULT]
    for command in (nl.replace, nl.append):
        with pytest.raises(RouteError) as caught:
            command(DHCP_DEFAULT)
        assert getattr(caught.value.__cause__, "code", None) == errno.EEXIST
    nl.replace(detour)  # identical to the group's first: nothing changes
    assert [r for r in nl.table if r.dst == "0.0.0.0/0"] == [detour, DHCP_DEFAULT]


def test_fake_imds_errors_are_raised() -> None:
    imds = FakeImds(fail_identity=ImdsError("down"))
    with pytest.raises(ImdsError):
        imds.identity()
