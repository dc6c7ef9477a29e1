"""Small fakes for the payload's injected dependencies (clock, IMDS, netlink, EC2), and their own checks.

The netlink fake follows the kernel's IPv4 rules that the payload relies on: a route's key is
(table, dst, metric), and the routes of one key form an ordered group; `add` of an existing key fails
with EEXIST; `append` adds after the group unless an identical route is in it (EEXIST); `replace` swaps
the group's first route (or adds one), is a no-op when that first route is identical, and fails with
EEXIST when an identical route is further down the group; a gateway must be reachable on a link
(ENETUNREACH otherwise); `del` matches the attributes given (an omitted source, metric, gateway or
interface matches any) and fails with ESRCH when none matches; an identical rule is refused (EEXIST);
`route_get` follows the rules by priority with their selectors (from, to, fwmark, not, iif lo,
uidrange), actions and suppress_prefixlength, and the route types (unreachable, prohibit, blackhole,
throw). tests/kernel/test_contract_netlink.py runs the same cases against the fake and the kernel.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
from botocore.exceptions import ClientError

from bootstrap import reclaim, route_model
from bootstrap.imds import Credentials, Identity, ImdsError
from bootstrap.netlink import RTNH_F_ONLINK
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


def _failure(what: str, code: int) -> RouteError:
    err = RouteError(f"routes: {what}: errno {code}")
    err.__cause__ = _FakeNetlinkError(code)
    return err


# Route types and rule actions as the kernel numbers them (rtnetlink.h, fib_rules.h).
RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT, RTN_THROW = 6, 7, 8, 9
FR_ACT_NOP, FR_ACT_BLACKHOLE, FR_ACT_UNREACHABLE, FR_ACT_PROHIBIT = 3, 6, 7, 8
# What a lookup that ends on such a route or rule answers (fib_props, fib4_rule_action).
_ROUTE_TYPE_ERRORS = {
    RTN_BLACKHOLE: errno.EINVAL,
    RTN_UNREACHABLE: errno.EHOSTUNREACH,
    RTN_PROHIBIT: errno.EACCES,
}
_RULE_ACTION_ERRORS = {
    FR_ACT_BLACKHOLE: errno.EINVAL,
    FR_ACT_UNREACHABLE: errno.ENETUNREACH,
    FR_ACT_PROHIBIT: errno.EACCES,
}
_ROUTE_TYPES = {"unreachable": RTN_UNREACHABLE, "blackhole": RTN_BLACKHOLE, "prohibit": RTN_PROHIBIT}
_RULE_ACTIONS = {
    "unreachable": FR_ACT_UNREACHABLE,
    "blackhole": FR_ACT_BLACKHOLE,
    "prohibit": FR_ACT_PROHIBIT,
}
_TABLES = {"main": 254, "local": 255, "default": 253}
RT_SCOPE_LINK = 253


@dataclass(frozen=True)
class RuleSelectors:
    """What a rule matches on beyond `Rule`'s fields, as the kernel evaluates it for local traffic."""

    dst: str | None = None
    iif: str | None = None
    uidrange: tuple[int, int] | None = None
    suppress_prefixlength: int = -1


class FakeNetlink:
    """The main table as a list; `calls` records every change, `fail_on` makes one operation fail.

    `ip(...)` seeds it as `ip route add` / `ip rule add` would the kernel (tests/kernel/test_contract_
    netlink.py runs the same cases against both).
    """

    def __init__(self, table: list[Route] | None = None, links: dict[str, int] | None = None) -> None:
        self.table = list(AL2023_TABLE if table is None else table)
        self.links = {MAC: IFINDEX} if links is None else links
        self.link_names: dict[str, int] = {}
        self.interface_addresses: dict[int, list[str]] = {IFINDEX: ["10.0.0.10/24"]}
        # The kernel's three rules of a fresh namespace; tests add theirs.
        self.rule_list: list[Rule] = [Rule(0, 255), Rule(32766, 254), Rule(32767, 253)]
        self.selectors: dict[Rule, RuleSelectors] = {}
        self.calls: list[tuple[str, Route]] = []
        self.rule_calls: list[tuple[str, Rule]] = []
        self.fail_on: dict[str, int] = {}
        self.on_change: Callable[[str, Route], None] = lambda command, route: None
        # The uid a lookup is made for (the kernel takes the caller's, as for the connection itself).
        self.uid = os.getuid()

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
        if "add_rule" in self.fail_on:
            raise _failure(f"rule add {rule.describe()}", self.fail_on["add_rule"])
        if rule in self.rule_list:
            # NLM_F_EXCL (pyroute2's add): an identical rule is refused.
            raise _failure(f"rule add {rule.describe()}", errno.EEXIST)
        self.rule_list.append(rule)

    def delete_rule(self, rule: Rule) -> bool:
        self.rule_calls.append(("delete", rule))
        if "delete_rule" in self.fail_on:
            raise _failure(f"rule del {rule.describe()}", self.fail_on["delete_rule"])
        for r in self.rules():
            if (r.priority, r.table, r.fwmark) == (rule.priority, rule.table, rule.fwmark):
                self.rule_list.remove(r)
                self.selectors.pop(r, None)
                return True
        return False

    # -- the lookup -------------------------------------------------------------------------------
    def _rule_matches(self, rule: Rule, dst: str, src: str | None, mark: int) -> bool:
        extra = self.selectors.get(rule, RuleSelectors())
        hit = True
        if rule.src is not None:
            hit = src is not None and ipaddress.IPv4Address(src) in ipaddress.IPv4Network(rule.src)
        if rule.fwmark is not None:
            hit = hit and (mark ^ rule.fwmark) & rule.fwmask == 0
        if extra.dst is not None:
            hit = hit and ipaddress.IPv4Address(dst) in ipaddress.IPv4Network(extra.dst)
        if extra.iif is not None:
            hit = hit and extra.iif == "lo"  # locally made traffic comes in on lo
        if extra.uidrange is not None:
            hit = hit and extra.uidrange[0] <= self.uid <= extra.uidrange[1]
        if rule.other and any(not w.startswith(("iif", "uidrange", "to")) for w in rule.other):
            hit = False  # oif, ports, protocols: a connection not yet made matches none of them
        return hit != rule.invert

    def _lookup(self, table: int, dst: str) -> Route | None:
        address = ipaddress.IPv4Address(dst)
        found = [r for r in self.routes(table) if address in ipaddress.IPv4Network(r.dst)]
        found.sort(key=lambda r: (-ipaddress.IPv4Network(r.dst).prefixlen, r.priority))
        return found[0] if found else None

    def route_get(self, dst: str, src: str | None = None, mark: int | None = None) -> PathLookup:
        """Rules by priority (selectors, actions, suppress_prefixlength), then the longest prefix in the
        rule's table, by route type, as the kernel's fib_rules_lookup for a locally made connection."""
        for rule in self.rules():
            if not self._rule_matches(rule, dst, src, mark or 0):
                continue
            if rule.action in _RULE_ACTION_ERRORS:
                raise _failure(f"get {dst}", _RULE_ACTION_ERRORS[rule.action])
            if rule.action != route_model.FR_ACT_TO_TBL:
                continue
            found = self._lookup(rule.table, dst)
            if found is None or found.type == RTN_THROW:
                continue
            if found.type in _ROUTE_TYPE_ERRORS:
                raise _failure(f"get {dst}", _ROUTE_TYPE_ERRORS[found.type])
            suppress = self.selectors.get(rule, RuleSelectors()).suppress_prefixlength
            if ipaddress.IPv4Network(found.dst).prefixlen <= suppress:
                continue
            source = src or found.prefsrc
            if source is None and found.oif in self.interface_addresses:
                source = self.interface_addresses[found.oif][0].split("/")[0]
            return PathLookup(found.gateway, found.oif, rule.table, source)
        raise _failure(f"get {dst}", errno.ENETUNREACH)

    # -- route changes --------------------------------------------------------------------------------
    def _record(self, command: str, route: Route) -> None:
        self.calls.append((command, route))
        if command in self.fail_on:
            raise route_failure(command, route, self.fail_on[command])
        self.on_change(command, route)

    def _group(self, route: Route) -> list[int]:
        """Positions of the routes with the route's key, in the kernel's order within the group."""
        return [i for i, r in enumerate(self.table) if _key(r) == _key(route)]

    def _check_gateway(self, command: str, route: Route) -> None:
        """The kernel refuses a gateway it cannot reach on a link (fib_check_nh): a link- or host-scope
        route to it, in the route's table or else in main, on the route's interface if it names one."""
        if route.gateway is None or route.flags & RTNH_F_ONLINK:
            return
        address = ipaddress.IPv4Address(route.gateway)
        for table in dict.fromkeys((route.table, route_model.MAIN_TABLE)):
            for r in self.routes(table):
                if (
                    r.type == route_model.RTN_UNICAST
                    and r.scope >= RT_SCOPE_LINK
                    and address in ipaddress.IPv4Network(r.dst)
                    and (route.oif is None or r.oif == route.oif)
                ):
                    return
        raise route_failure(command, route, errno.ENETUNREACH)

    def add(self, route: Route) -> None:
        self._record("add", route)
        self._check_gateway("add", route)
        if self._group(route):
            raise route_failure("add", route, errno.EEXIST)
        self.table.append(route)

    def append(self, route: Route) -> None:
        self._record("append", route)
        self._check_gateway("append", route)
        group = self._group(route)
        if any(self.table[i] == route for i in group):
            raise route_failure("append", route, errno.EEXIST)
        self.table.insert(group[-1] + 1 if group else len(self.table), route)

    def replace(self, route: Route) -> None:
        self._record("replace", route)
        self._check_gateway("replace", route)
        group = self._group(route)
        if not group:
            self.table.append(route)
        elif self.table[group[0]] == route:
            return
        elif any(self.table[i] == route for i in group):
            raise route_failure("replace", route, errno.EEXIST)
        else:
            self.table[group[0]] = route

    def _deletes(self, asked: Route, r: Route) -> bool:
        """fib_table_delete: type and scope as given; source, protocol, metric, gateway and interface only
        where given (an omitted one is a wildcard); metrics given must match."""
        return (
            (r.table, r.dst, r.type, r.scope) == (asked.table, asked.dst, asked.type, asked.scope)
            and asked.prefsrc in (None, r.prefsrc)
            and asked.proto in (0, r.proto)
            and asked.priority in (0, r.priority)
            and asked.gateway in (None, r.gateway)
            and asked.oif in (None, r.oif)
            and all(metric in r.metrics for metric in asked.metrics)
        )

    def delete(self, route: Route) -> bool:
        self._record("delete", route)
        candidates = sorted(
            (i for i, r in enumerate(self.table) if self._deletes(route, r)),
            key=lambda i: self.table[i].priority,
        )
        if not candidates:
            return False
        del self.table[candidates[0]]
        return True

    def changes(self) -> list[tuple[str, Route]]:
        return list(self.calls)

    @contextmanager
    def open(self) -> Iterator[FakeNetlink]:
        yield self

    # -- seeding, in `ip` words -----------------------------------------------------------------
    def ip(self, *args: str) -> None:
        """`ip route add ...` or `ip rule add ...`, as far as the contract tests use them."""
        words = list(args)
        if words[:2] == ["route", "add"]:
            self._seed_route(words[2:])
        elif words[:2] == ["rule", "add"]:
            self._seed_rule(words[2:])
        else:
            raise ValueError(f"FakeNetlink.ip: unsupported: {' '.join(args)}")

    def _table(self, name: str) -> int:
        return _TABLES.get(name) or int(name)

    def _seed_route(self, words: list[str]) -> None:
        kind = route_model.RTN_UNICAST
        if words[0] in (*_ROUTE_TYPES, "throw"):
            kind = RTN_THROW if words[0] == "throw" else _ROUTE_TYPES[words[0]]
            words = words[1:]
        dst = "0.0.0.0/0" if words[0] == "default" else str(ipaddress.IPv4Network(words[0]))
        options = dict(zip(words[1::2], words[2::2]))
        oif = self.link_names[options["dev"]] if "dev" in options else None
        gateway = options.get("via")
        scope = RT_SCOPE_LINK if gateway is None and kind == route_model.RTN_UNICAST else 0
        route = Route(
            dst=dst,
            gateway=gateway,
            oif=oif,
            priority=int(options.get("metric", 0)),
            proto=3,  # `ip route add`: boot
            scope=scope,
            table=self._table(options.get("table", "main")),
            type=kind,
        )
        self._check_gateway("add", route)
        if self._group(route):
            raise route_failure("add", route, errno.EEXIST)
        self.table.append(route)

    def _seed_rule(self, words: list[str]) -> None:
        invert = words[:1] == ["not"]
        words = words[1:] if invert else words
        action, table = route_model.FR_ACT_TO_TBL, route_model.MAIN_TABLE
        src = fwmark = None
        fwmask = route_model.ALL_BITS
        other: list[str] = []
        extra: dict[str, object] = {}
        priority = None
        while words:
            word = words.pop(0)
            if word in _RULE_ACTIONS:
                action, table = _RULE_ACTIONS[word], 0
                continue
            value = words.pop(0)
            if word == "from":
                src = None if value == "all" else str(ipaddress.IPv4Network(value))
            elif word == "to":
                extra["dst"] = str(ipaddress.IPv4Network(value))
                other.insert(0, f"to {extra['dst']}")
            elif word == "fwmark":
                mark, _, mask = value.partition("/")
                fwmark, fwmask = int(mark, 0), int(mask, 0) if mask else route_model.ALL_BITS
            elif word == "iif":
                extra["iif"] = value
                other.append(f"iif {value}")
            elif word == "uidrange":
                low, _, high = value.partition("-")
                extra["uidrange"] = (int(low), int(high))
                other.append(f"uidrange {value}")
            elif word in ("table", "lookup"):
                table = self._table(value)
            elif word == "suppress_prefixlength":
                extra["suppress_prefixlength"] = int(value)
            elif word in ("pref", "priority"):
                priority = int(value)
            else:
                raise ValueError(f"FakeNetlink.ip: unsupported rule selector {word}")
        if priority is None:
            # The kernel's default: just ahead of the first rule after priority 0.
            priority = next(r.priority for r in self.rules() if r.priority > 0) - 1
        rule = Rule(
            priority,
            table,
            src=src,
            fwmark=fwmark,
            fwmask=fwmask,
            action=action,
            invert=invert,
            other=tuple(other),
        )
        self.rule_list.append(rule)
        if extra:
            self.selectors[rule] = RuleSelectors(**extra)  # type: ignore[arg-type]


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
