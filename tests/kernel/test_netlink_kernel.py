"""The netlink adapter against the real kernel, and the unit tests' fake held to the same behaviour."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from tests import netns
from tests.kernel.world import REPO

pytestmark = pytest.mark.root

# Runs inside a namespace: the same operations through PyRoute2Netlink and through FakeNetlink.
SCRIPT = r"""
import errno, json
from dataclasses import replace
from bootstrap import reclaim, route_model, routes
from bootstrap.route_model import Route, RouteError
from tests.unit.test_bootstrap_fakes import FakeNetlink

def scenario(nl, ifindex):
    out = []
    default = Route(dst="0.0.0.0/0", gateway="10.0.0.1", oif=ifindex, priority=512, proto=16,
                    prefsrc="10.0.0.10", metrics=(("RTAX_MTU", 1400),))
    subnet = Route(dst="10.0.0.0/24", oif=ifindex, priority=512, proto=2, scope=253, prefsrc="10.0.0.10")
    pin = Route(dst="169.254.169.254/32", gateway="10.0.0.1", oif=ifindex)
    for command, route in (("add", subnet), ("add", default), ("add", pin)):
        getattr(nl, command)(route)
    try:
        nl.add(replace(pin, gateway="10.0.0.4"))
        out.append("add-existing: ok")
    except RouteError as err:
        out.append(f"add-existing: errno {err.__cause__.code}")
    nl.replace(replace(default, gateway="10.0.0.4"))
    nl.replace(replace(default, priority=1024))
    out.append(f"delete-present: {nl.delete(pin)}")
    out.append(f"delete-absent: {nl.delete(pin)}")
    table = sorted((r.dst, r.gateway, r.priority, r.proto, r.scope, r.prefsrc, list(r.metrics))
                   for r in nl.routes(route_model.MAIN_TABLE))
    return {"events": out, "table": table}

def group(nl, ifindex):
    # One (dst, metric) group with several routes: what a DHCP client's NLM_F_APPEND makes of a detour.
    out = []
    dhcp = Route(dst="0.0.0.0/0", gateway="10.0.0.1", oif=ifindex, priority=700, proto=16,
                 prefsrc="10.0.0.10")
    detour = replace(dhcp, gateway="10.0.0.4")
    static = Route(dst="0.0.0.0/0", gateway="10.0.0.1", oif=ifindex, priority=700)
    def order():
        table = routes._defaults(nl.routes(route_model.MAIN_TABLE))
        return [[r.gateway, r.proto] for r in table if r.priority == 700]
    def step(name, command, route):
        try:
            getattr(nl, command)(route)
            out.append(f"{name}: ok {order()}")
        except RouteError as err:
            out.append(f"{name}: errno {err.__cause__.code} {order()}")
    step("replace-into-empty", "replace", detour)
    step("append-sibling", "append", dhcp)
    step("append-identical", "append", dhcp)
    step("replace-identical-not-first", "replace", dhcp)
    step("replace-identical-first", "replace", detour)
    step("add-to-group", "add", static)
    step("append-third", "append", static)
    step("delete-first", "delete", detour)
    step("replace-first", "replace", detour)
    return out

with reclaim.pyroute2_netlink() as nl:
    ifindex = nl.link_index("02:00:0a:00:00:0a")
    real = scenario(nl, ifindex)
    real_group = group(nl, ifindex)
fake = scenario(FakeNetlink(table=[], links={"02:00:0a:00:00:0a": ifindex}), ifindex)
fake_group = group(FakeNetlink(table=[], links={"02:00:0a:00:00:0a": ifindex}), ifindex)
print(json.dumps({"real": real, "fake": fake, "real_group": real_group, "fake_group": fake_group}))
"""


@pytest.fixture
def ns() -> Iterator[netns.Netns]:
    with netns.netns("nl") as ns:
        ns.ip("link", "add", "uplink7", "type", "veth", "peer", "name", "peer7")
        ns.ip("link", "set", "uplink7", "address", "02:00:0a:00:00:0a", "up")
        ns.ip("link", "set", "peer7", "up")
        ns.ip("addr", "add", "10.0.0.10/24", "dev", "uplink7", "noprefixroute")
        yield ns


def test_adapter_and_fake_agree_with_the_kernel(ns: netns.Netns) -> None:
    done = ns.run("env", f"PYTHONPATH={REPO}", sys.executable, "-c", SCRIPT)
    result = json.loads(done.stdout)
    real, fake = result["real"], result["fake"]
    assert real["events"] == ["add-existing: errno 17", "delete-present: True", "delete-absent: False"]
    # Replace keys on (dst, metric): the metric-512 route was swapped in place, the metric-1024 one added,
    # and the MTU metric went through both ways.
    defaults = [row for row in real["table"] if row[0] == "0.0.0.0/0"]
    assert defaults == [
        ["0.0.0.0/0", "10.0.0.1", 1024, 16, 0, "10.0.0.10", [["RTAX_MTU", 1400]]],
        ["0.0.0.0/0", "10.0.0.4", 512, 16, 0, "10.0.0.10", [["RTAX_MTU", 1400]]],
    ]
    assert fake == real


def test_append_and_replace_within_a_group_as_the_fake_has_them(ns: netns.Netns) -> None:
    """The kernel's rules the restore relies on: APPEND goes behind a same-metric sibling; a replace of a
    route identical to one behind the group's first is refused (EEXIST); identical to the first: no-op."""
    done = ns.run("env", f"PYTHONPATH={REPO}", sys.executable, "-c", SCRIPT)
    result = json.loads(done.stdout)
    nat, dhcp, static = ["10.0.0.4", 16], ["10.0.0.1", 16], ["10.0.0.1", 4]
    assert result["real_group"] == [
        f"replace-into-empty: ok {[nat]}",
        f"append-sibling: ok {[nat, dhcp]}",
        f"append-identical: errno 17 {[nat, dhcp]}",
        f"replace-identical-not-first: errno 17 {[nat, dhcp]}",
        f"replace-identical-first: ok {[nat, dhcp]}",
        f"add-to-group: errno 17 {[nat, dhcp]}",
        f"append-third: ok {[nat, dhcp, static]}",
        f"delete-first: ok {[dhcp, static]}",
        f"replace-first: ok {[nat, static]}",
    ]
    assert result["fake_group"] == result["real_group"]


def test_the_interface_is_found_by_mac_whatever_its_name(ns: netns.Netns) -> None:
    script = (
        "from bootstrap import reclaim\n"
        "with reclaim.pyroute2_netlink() as nl:\n"
        "    print(nl.link_index('02:00:0a:00:00:0a'), nl.link_index('02:00:00:00:00:99'))"
    )
    index, missing = ns.run("env", f"PYTHONPATH={REPO}", sys.executable, "-c", script).stdout.split()
    assert missing == "None"
    assert ns.ip("-j", "link", "show", "uplink7").count(f'"ifindex":{index}') == 1
