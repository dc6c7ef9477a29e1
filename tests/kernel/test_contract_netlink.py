"""The netlink contract: the same cases against the unit tests' FakeNetlink and against the kernel.

Every netlink operation the payload performs (bootstrap/netlink.py's adapter: link_index, addresses,
routes, add, append, replace, delete, route_get, rules, add_rule, delete_rule), refusals included, is
asked of both backends; each case's transcript is written here as the kernel answers it, and the fake
must give the same. The kernel backend is the payload's own adapter (`PyRoute2Netlink`) in a namespace
made for the test (root); the fake backend needs nothing, so it runs wherever the unit tests run.
Cases seed what the payload never writes (a VPN's rules, unreachable routes) in `ip` words: `ip` itself
in the namespace, `FakeNetlink.ip` for the fake.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from bootstrap.route_model import MAIN_TABLE, Route, RouteError, Rule
from tests import netns
from tests.unit.test_bootstrap_fakes import FakeNetlink

MAC = "02:00:0a:00:00:0a"
ADDRESS = "10.0.0.10"
API = "203.0.113.10"


@dataclass
class Backend:
    nl: Any
    ifindex: int
    tunnel: int
    ip: Callable[..., object]


def _fake() -> Iterator[Backend]:
    ifindex, tunnel = 7, 8
    fake = FakeNetlink(table=[], links={MAC: ifindex})
    fake.link_names = {"uplink7": ifindex, "wg0": tunnel}
    fake.interface_addresses = {ifindex: [f"{ADDRESS}/24"], tunnel: ["10.200.0.2/32"]}
    yield Backend(fake, ifindex, tunnel, fake.ip)


def _kernel() -> Iterator[Backend]:
    from pyroute2 import NetNS

    from bootstrap.netlink import PyRoute2Netlink

    with netns.netns("contract") as ns:
        for link, peer in (("uplink7", "peer7"), ("wg0", "wg0-peer")):
            ns.ip("link", "add", link, "type", "veth", "peer", "name", peer)
            for name in (link, peer):
                ns.run("sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1")
            ns.ip("link", "set", peer, "up")
        ns.ip("link", "set", "uplink7", "address", MAC, "up")
        ns.ip("link", "set", "wg0", "up")
        # No prefix route: each case adds the routes it needs, to the kernel and the fake alike.
        ns.ip("addr", "add", f"{ADDRESS}/24", "dev", "uplink7", "noprefixroute")
        ns.ip("addr", "add", "10.200.0.2/32", "dev", "wg0")
        ipr = NetNS(ns.name)
        try:
            nl = PyRoute2Netlink(ipr)
            ifindex = nl.link_index(MAC)
            tunnel = int(ns.ip("-j", "link", "show", "wg0").split('"ifindex":')[1].split(",")[0])
            yield Backend(nl, ifindex, tunnel, ns.ip)
        finally:
            ipr.close()


@pytest.fixture(params=[pytest.param("fake"), pytest.param("kernel", marks=pytest.mark.root)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from (_fake() if request.param == "fake" else _kernel())


def outcome(action: Callable[[], object]) -> str:
    """'ok', the value returned, or the errno the operation was refused with."""
    try:
        value = action()
    except RouteError as err:
        return f"errno {errno.errorcode.get(getattr(err.__cause__, 'code', -1), '?')}"
    return "ok" if value is None else str(value)


def subnet(b: Backend) -> Route:
    return Route(dst="10.0.0.0/24", oif=b.ifindex, priority=512, proto=2, scope=253, prefsrc=ADDRESS)


def dhcp_default(b: Backend, **changes: Any) -> Route:
    route = Route(dst="0.0.0.0/0", gateway="10.0.0.1", oif=b.ifindex, priority=512, proto=16, prefsrc=ADDRESS)
    return replace(route, **changes)


def main_table(b: Backend) -> list[tuple[Any, ...]]:
    """The main table without interface numbers: (dst, gateway, metric, protocol, source)."""
    return sorted((r.dst, r.gateway, r.priority, r.proto, r.prefsrc) for r in b.nl.routes(MAIN_TABLE))


# -- the interface -------------------------------------------------------------------------------


def test_the_interface_is_found_by_mac_and_its_addresses_read(backend: Backend) -> None:
    assert backend.nl.link_index(MAC) == backend.ifindex
    assert backend.nl.link_index("02:00:00:00:00:99") is None
    assert backend.nl.addresses(backend.ifindex) == [f"{ADDRESS}/24"]


# -- routes: add, append, replace, delete ----------------------------------------------------------


def test_add_replace_and_delete_key_on_destination_and_metric(backend: Backend) -> None:
    b = backend
    default = dhcp_default(b, metrics=(("RTAX_MTU", 1400),))
    pin = Route(dst="169.254.169.254/32", gateway="10.0.0.1", oif=b.ifindex)
    for route in (subnet(b), default, pin):
        b.nl.add(route)
    events = [
        outcome(lambda: b.nl.add(replace(pin, gateway="10.0.0.4"))),
        outcome(lambda: b.nl.replace(replace(default, gateway="10.0.0.4"))),
        outcome(lambda: b.nl.replace(replace(default, priority=1024))),
        outcome(lambda: b.nl.delete(pin)),
        outcome(lambda: b.nl.delete(pin)),
    ]
    assert events == ["errno EEXIST", "ok", "ok", "True", "False"]
    defaults = [(r.gateway, r.priority, r.metrics) for r in b.nl.routes(MAIN_TABLE) if r.dst == "0.0.0.0/0"]
    assert sorted(defaults) == [
        ("10.0.0.1", 1024, (("RTAX_MTU", 1400),)),
        ("10.0.0.4", 512, (("RTAX_MTU", 1400),)),
    ]


def test_append_and_replace_within_one_destination_and_metric(backend: Backend) -> None:
    """A DHCP client's NLM_F_APPEND beside a detour; replace of a route behind the group's first."""
    b = backend
    b.nl.add(subnet(b))
    dhcp = dhcp_default(b, priority=700)
    detour = replace(dhcp, gateway="10.0.0.4")
    static = Route(dst="0.0.0.0/0", gateway="10.0.0.1", oif=b.ifindex, priority=700)

    def order() -> list[tuple[Any, ...]]:
        return [(r.gateway, r.proto) for r in b.nl.routes(MAIN_TABLE) if r.dst == "0.0.0.0/0"]

    steps = [
        ("replace", detour),
        ("append", dhcp),
        ("append", dhcp),
        ("replace", dhcp),
        ("replace", detour),
        ("add", static),
        ("append", static),
        ("delete", detour),
        ("replace", detour),
    ]
    transcript = [(outcome(lambda c=c, r=r: getattr(b.nl, c)(r)), order()) for c, r in steps]
    nat, router, static_ = ("10.0.0.4", 16), ("10.0.0.1", 16), ("10.0.0.1", 4)
    assert transcript == [
        ("ok", [nat]),
        ("ok", [nat, router]),
        ("errno EEXIST", [nat, router]),
        ("errno EEXIST", [nat, router]),
        ("ok", [nat, router]),
        ("errno EEXIST", [nat, router]),
        ("ok", [nat, router, static_]),
        ("True", [router, static_]),
        ("ok", [nat, static_]),
    ]


def test_delete_treats_an_omitted_source_metric_or_gateway_as_a_wildcard(backend: Backend) -> None:
    b = backend
    b.nl.add(subnet(b))
    asks = [
        dhcp_default(b, prefsrc=None),
        dhcp_default(b, priority=0),
        dhcp_default(b, gateway=None, oif=None),
        dhcp_default(b, prefsrc="10.0.0.99"),
        dhcp_default(b, priority=513),
        dhcp_default(b, proto=4),
        dhcp_default(b, gateway="10.0.0.4"),
        dhcp_default(b, metrics=(("RTAX_MTU", 1400),)),
    ]
    results = []
    for ask in asks:
        b.nl.add(dhcp_default(b))
        results.append(outcome(lambda a=ask: b.nl.delete(a)))
        if results[-1] == "False":
            b.nl.delete(dhcp_default(b))
    assert results == ["True", "True", "True", "False", "False", "False", "False", "False"]


@pytest.mark.parametrize("command", ["add", "append", "replace"])
def test_a_gateway_that_is_not_on_a_link_is_refused(backend: Backend, command: str) -> None:
    b = backend
    far = Route(dst="0.0.0.0/0", gateway="10.0.0.4", oif=b.ifindex)
    # No route reaches 10.0.0.4 yet (the address has no prefix route): refused.
    first = outcome(lambda: getattr(b.nl, command)(far))
    # A route via a gateway is not a link: still refused.
    b.nl.add(Route(dst="10.0.0.0/25", gateway="10.0.0.200", oif=b.ifindex, flags=4))
    second = outcome(lambda: getattr(b.nl, command)(far))
    # The subnet's link route: accepted.
    b.nl.add(subnet(b))
    third = outcome(lambda: getattr(b.nl, command)(far))
    assert (first, second, third) == ("errno ENETUNREACH", "errno ENETUNREACH", "ok")


# -- rules -----------------------------------------------------------------------------------------


def test_rules_are_listed_added_once_and_deleted(backend: Backend) -> None:
    b = backend
    mark = Rule(100, 57776, fwmark=0xE1B0)
    events = [
        outcome(lambda: b.nl.add_rule(mark)),
        outcome(lambda: b.nl.add_rule(mark)),
    ]
    listed = [(r.priority, r.table, r.fwmark) for r in b.nl.rules()]
    events += [outcome(lambda: b.nl.delete_rule(mark)), outcome(lambda: b.nl.delete_rule(mark))]
    assert events == ["ok", "errno EEXIST", "True", "False"]
    assert listed == [(0, 255, None), (100, 57776, 0xE1B0), (32766, 254, None), (32767, 253, None)]


def test_seeded_rules_read_back_as_the_adapter_reports_them(backend: Backend) -> None:
    b = backend
    b.ip("rule", "add", "iif", "lo", "lookup", "300", "pref", "50")
    b.ip("rule", "add", "not", "fwmark", "0xca6c", "table", "51820")
    b.ip("rule", "add", "table", "main", "suppress_prefixlength", "0")
    b.ip("rule", "add", "fwmark", "9", "unreachable", "pref", "70")
    described = [r.describe() for r in b.nl.rules()]
    # Rules added without a priority go just ahead of the first after 0; the suppressing rule reads as
    # a plain "lookup main" (the adapter does not report suppress_prefixlength).
    assert described == [
        "rule 0: from all lookup local",
        "rule 48: from all lookup main",
        "rule 49: not from all fwmark 0xca6c lookup 51820",
        "rule 50: from all iif lo lookup 300",
        "rule 70: from all fwmark 0x9 action 7",
        "rule 32766: from all lookup main",
        "rule 32767: from all lookup default",
    ]


# -- route_get: the path check's question --------------------------------------------------------


def path(b: Backend, dst: str = API, src: str | None = None, mark: int | None = None) -> str:
    def ask() -> str:
        found = b.nl.route_get(dst, src=src, mark=mark)
        device = {b.ifindex: "uplink7", b.tunnel: "wg0"}.get(found.oif, str(found.oif))
        return f"via {found.gateway} dev {device} table {found.table} src {found.prefsrc}"

    return outcome(ask)


def seed_lan(b: Backend) -> None:
    b.nl.add(subnet(b))
    b.nl.add(dhcp_default(b))


def test_a_lookup_with_no_route_is_refused(backend: Backend) -> None:
    assert path(backend) == "errno ENETUNREACH"


def test_the_wg_quick_rules_send_unmarked_traffic_into_the_tunnel(backend: Backend) -> None:
    """wg-quick: `not fwmark X table Y`, then `table main suppress_prefixlength 0`: main answers for
    anything but its default route; the rest goes to the tunnel unless marked."""
    b = backend
    seed_lan(b)
    b.ip("route", "add", "default", "dev", "wg0", "table", "51820")
    b.ip("rule", "add", "not", "fwmark", "0xca6c", "table", "51820")
    b.ip("rule", "add", "table", "main", "suppress_prefixlength", "0")
    assert [path(b), path(b, mark=0xCA6C), path(b, dst="10.0.0.99")] == [
        "via None dev wg0 table 51820 src 10.200.0.2",
        f"via 10.0.0.1 dev uplink7 table 254 src {ADDRESS}",
        f"via None dev uplink7 table 254 src {ADDRESS}",
    ]


def test_rules_with_iif_lo_and_uidrange_match_locally_made_traffic(backend: Backend) -> None:
    b = backend
    seed_lan(b)
    b.ip("route", "add", "default", "via", "10.0.0.7", "dev", "uplink7", "table", "300")
    b.ip("route", "add", "default", "via", "10.0.0.8", "dev", "uplink7", "table", "301")
    b.ip("rule", "add", "uidrange", "0-4294967294", "lookup", "301", "pref", "60")
    first = path(b)
    b.ip("rule", "add", "iif", "lo", "lookup", "300", "pref", "50")
    second = path(b)
    assert [first, second] == [
        f"via 10.0.0.8 dev uplink7 table 301 src {ADDRESS}",
        f"via 10.0.0.7 dev uplink7 table 300 src {ADDRESS}",
    ]


def test_unreachable_throw_and_rule_actions(backend: Backend) -> None:
    b = backend
    seed_lan(b)
    b.ip("route", "add", "unreachable", "198.51.100.0/24")
    b.ip("route", "add", "prohibit", "192.0.2.0/24")
    in_main = [path(b, dst="198.51.100.1"), path(b, dst="192.0.2.1")]
    # A table ahead of main whose throw route sends the API's prefix on to the next rule.
    b.ip("route", "add", "throw", "203.0.113.0/24", "table", "300")
    b.ip("route", "add", "default", "via", "10.0.0.7", "dev", "uplink7", "table", "300")
    b.ip("rule", "add", "lookup", "300", "pref", "50")
    thrown = [path(b), path(b, dst="100.64.0.1")]
    b.ip("rule", "add", "fwmark", "9", "unreachable", "pref", "40")
    b.ip("rule", "add", "fwmark", "10", "blackhole", "pref", "41")
    b.ip("rule", "add", "fwmark", "11", "prohibit", "pref", "42")
    actions = [path(b, mark=9), path(b, mark=10), path(b, mark=11)]
    assert in_main == ["errno EHOSTUNREACH", "errno EACCES"]
    assert thrown == [
        f"via 10.0.0.1 dev uplink7 table 254 src {ADDRESS}",
        f"via 10.0.0.7 dev uplink7 table 300 src {ADDRESS}",
    ]
    assert actions == ["errno ENETUNREACH", "errno EINVAL", "errno EACCES"]


# -- the fake's switch for failures ------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["add", "append", "replace", "delete", "add_rule", "delete_rule"])
def test_the_fake_fails_any_operation_on_request(operation: str) -> None:
    """fail_on covers every change the payload makes, rules included (a kernel refusal, on demand)."""
    fake = next(_fake())
    fake.nl.fail_on[operation] = errno.EPERM
    argument = Rule(100, 57776, fwmark=0xE1B0) if "rule" in operation else subnet(fake)
    assert outcome(lambda: getattr(fake.nl, operation)(argument)) == "errno EPERM"
