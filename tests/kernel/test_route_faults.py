"""Route-level faults of the payload against the real kernel: every table exactly as it was."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest

from tests import netns
from tests.kernel import world as lab
from tests.kernel.conftest import both_payloads
from tests.kernel.world import World

pytestmark = pytest.mark.root

# The same fixtures as the payload's own kernel tests: this checkout, or the shipped bundle under Python 3.9.


def _congestion(table: list[dict[str, Any]]) -> list[Any]:
    return [r.get("metrics") for r in table if r["dst"] == "default"]


@both_payloads
def test_a_congestion_control_metric_comes_back_exactly(w: World) -> None:
    """RTAX_CC_ALGO is a name, not a number: journaled, detoured and restored as it was."""
    w.inst.ip("route", "replace", *f"{lab.AL2023_ROUTES[-1]} mtu 1400 congctl cubic".split())
    before = w.all_routes()
    assert _congestion(before) == [[{"mtu": 1400, "congestion": "cubic"}]], "congctl refused here"
    code, _, err = w.run_payload(w.config())
    assert code == 0, err
    assert w.all_routes() == before
    assert not w.journal.exists()
    assert w.holder() == w.ids["self"]


def test_a_pin_flushed_during_the_detour_is_put_back_and_removed_by_the_restore(w: World) -> None:
    """A lease renewal may flush routes: the next call's re-assertion adds the pin back."""
    before = w.all_routes()
    time_pin = f"169.254.169.123 via {lab.ROUTER} dev {lab.IFNAME}"
    w.pause_api()
    proc = w.start_payload(w.config())
    try:
        w.wait_for_detour()
        # Past the identity guard and the first call's re-assertion: that call waits on the paused API.
        time.sleep(1.0)
        w.inst.ip("route", "del", *time_pin.split())
        w.inst.ip("route", "del", lab.VPC_CIDR)
        assert not [r for r in w.routes() if r["dst"] in ("169.254.169.123", lab.VPC_CIDR)]
    finally:
        w.resume_api()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "pin 169.254.169.123/32 via 10.0.0.1" in err and "added back" in err
    assert f"pin {lab.VPC_CIDR} via" in err
    assert w.all_routes() == before
    assert not w.journal.exists()


@both_payloads
def test_a_leftover_detour_without_a_journal_is_put_back_via_the_router(w: World) -> None:
    """The journal is gone (removed, or /run lost) but the detour stayed: it is not the original."""
    before = w.all_routes()
    leftover = lab.AL2023_ROUTES[-1].replace(f"via {lab.ROUTER}", f"via {lab.NAT}")
    w.inst.ip("route", "replace", *leftover.split())
    assert [r["gateway"] for r in w.defaults()] == [lab.NAT]
    code, _, err = w.run_payload(w.config())
    assert code == 0, err
    assert w.all_routes() == before
    assert err.count("no journal accounts for") == 1, err
    assert w.holder() == w.ids["self"]


def _rules(w: World) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = json.loads(w.inst.ip("-j", "rule", "show") or "[]")
    return rules


SOURCE_RULE = f"from {lab.ADDRESS} lookup 10000 pref 10000"
TABLE_10000 = f"default via {lab.ROUTER} dev {lab.IFNAME} table 10000"


def _bypassed_quickly(w: World) -> str:
    """Run the payload; it must stop with 75 long before its 20 s deadline, every table and rule as found."""
    before, rules_before = w.all_routes(), _rules(w)
    started = time.monotonic()
    code, _, err = w.run_payload(w.config())
    took = time.monotonic() - started
    assert code == 75, err
    assert took < 10, f"{took:.1f} s: the run waited for the API instead of checking the path\n{err}"
    assert w.all_routes() == before
    assert _rules(w) == rules_before
    assert not w.journal.exists()
    assert w.holder() == w.ids["other"]
    print(f"bypass reported after {took:.2f} s")
    return err


@both_payloads
def test_a_source_rule_ahead_of_main_stops_the_run_at_once_naming_it(w: World) -> None:
    """amazon-ec2-net-utils (and operators) send the primary address's traffic to a table of its own."""
    w.inst.ip("rule", "add", *SOURCE_RULE.split())
    w.inst.ip("route", "add", *TABLE_10000.split())
    err = _bypassed_quickly(w)
    assert (
        f"the API connection to {lab.API} would leave via {lab.ROUTER} "
        f"(rule 10000: from {lab.ADDRESS} lookup 10000; route 0.0.0.0/0 via {lab.ROUTER}"
    ) in err, err
    assert f"not the NAT {lab.NAT}; restoring" in err


@both_payloads
def test_vpn_style_half_routes_stop_the_run_at_once_naming_the_route(w: World) -> None:
    for half in ("0.0.0.0/1", "128.0.0.0/1"):
        w.inst.ip("route", "add", half, "via", lab.ROUTER, "dev", lab.IFNAME)
    err = _bypassed_quickly(w)
    assert f"(rule 32766: from all lookup main; route 128.0.0.0/1 via {lab.ROUTER}" in err, err


# wg-quick's full-tunnel pattern: every unmarked packet to a table whose default route is the tunnel,
# and the main table consulted first for anything more specific than a default route.
WG_TABLE = "51820"
WG_MARK = "0xca6c"


def _wg_quick(w: World) -> None:
    # The tunnel's interface (a veth stands in: the kernel's routing sees an interface, whatever its kind),
    # IPv4 only, so no IPv6 route appears while the test compares tables.
    w.inst.ip("link", "add", "wg0", "type", "veth", "peer", "name", "wg0-peer")
    for link in ("wg0", "wg0-peer"):
        w.inst.run("sysctl", "-qw", f"net.ipv6.conf.{link}.disable_ipv6=1")
    w.inst.ip("addr", "add", "10.200.0.2/32", "dev", "wg0")
    w.inst.ip("link", "set", "wg0-peer", "up")
    w.inst.ip("link", "set", "wg0", "up")
    # IMDS kept out of the tunnel, as an EC2 host running a full tunnel must: a host route is more
    # specific than a default route, so the suppressing rule does not skip it.
    w.inst.ip("route", "add", "169.254.169.254/32", "via", lab.ROUTER, "dev", lab.IFNAME)
    w.inst.ip("route", "add", "default", "dev", "wg0", "table", WG_TABLE)
    w.inst.ip("rule", "add", "not", "fwmark", WG_MARK, "table", WG_TABLE)
    w.inst.ip("rule", "add", "table", "main", "suppress_prefixlength", "0")


def test_wg_quick_bypasses_a_main_table_detour_and_the_run_stops_at_once(w: World) -> None:
    """The detour's default route in main is suppressed (prefix length 0), so unmarked API traffic goes
    to the tunnel's table: a real bypass, which the kernel's answer to the path check shows."""
    _wg_quick(w)
    err = _bypassed_quickly(w)
    assert f"the API connection to {lab.API} would leave directly (no gateway) on interface index" in err, err
    assert f"not the NAT {lab.NAT}; restoring" in err


def test_wg_quick_does_not_bypass_the_policy_route_detour(w: World) -> None:
    """The payload's mark rule (priority 100) comes before wg-quick's rules: its marked connections take
    the NAT, and the run heals."""
    _wg_quick(w)
    rules_before = _rules(w)
    code, _, err = w.run_payload(w.config(egress="policy-route"))
    assert code == 0, err
    assert w.holder() == w.ids["self"]
    assert f"routes: the API connection to {lab.API} leaves via {lab.NAT}" in err, err
    assert _rules(w) == rules_before


# Runs inside a namespace: the same path questions to the kernel and to FakeNetlink.
PATH_SCRIPT = r"""
import json
from dataclasses import asdict
from bootstrap import reclaim
from bootstrap.route_model import Route, Rule
from tests.unit.test_bootstrap_fakes import FakeNetlink

QUESTIONS = [("203.0.113.10", None, None), ("203.0.113.10", "10.0.0.10", None),
             ("203.0.113.10", "10.0.0.10", 5), ("10.0.0.99", "10.0.0.10", None),
             ("198.51.100.1", "10.0.0.10", 6), ("100.64.0.1", None, None)]

def ask(nl):
    out = []
    for dst, src, mark in QUESTIONS:
        path = nl.route_get(dst, src=src, mark=mark)
        out.append([dst, src, mark, path.gateway, path.oif, path.table])
    return {"paths": out, "rules": [asdict(r) for r in nl.rules()]}

with reclaim.pyroute2_netlink() as nl:
    ifindex = nl.link_index("02:00:0a:00:00:0a")
    real = ask(nl)
    real_routes = {t: [asdict(r) for r in nl.routes(t)] for t in (254, 10000, 200)}
fake = FakeNetlink(table=[], links={})
for t, rows in real_routes.items():
    fake.table += [Route(**{**r, "metrics": tuple(map(tuple, r["metrics"]))}) for r in rows]
fake.rule_list += [Rule(100, 200, fwmark=5), Rule(10000, 10000, src="10.0.0.10/32"),
                   Rule(150, 200, fwmark=0, fwmask=0xF, invert=True)]
print(json.dumps({"real": real, "fake": ask(fake)}))
"""


def test_route_get_and_rules_of_the_fake_agree_with_the_kernel() -> None:
    with netns.netns("path") as ns:
        ns.ip("link", "add", "uplink7", "type", "veth", "peer", "name", "peer7")
        ns.ip("link", "set", "uplink7", "address", "02:00:0a:00:00:0a", "up")
        ns.ip("link", "set", "peer7", "up")
        ns.ip("addr", "add", "10.0.0.10/24", "dev", "uplink7")
        for route in (
            "default via 10.0.0.4 dev uplink7 proto dhcp metric 512",
            "default via 10.0.0.5 dev uplink7 metric 1024",
            "100.64.0.0/10 via 10.0.0.6 dev uplink7",
            "default via 10.0.0.1 dev uplink7 table 10000",
            "10.0.0.0/24 dev uplink7 table 10000",
            "default via 10.0.0.7 dev uplink7 table 200",
        ):
            ns.ip("route", "add", *route.split())
        for rule in (
            "fwmark 5 lookup 200 pref 100",
            "from 10.0.0.10 lookup 10000 pref 10000",
            "not fwmark 0/0xf lookup 200 pref 150",
        ):
            ns.ip("rule", "add", *rule.split())
        done = ns.run("env", f"PYTHONPATH={lab.REPO}", sys.executable, "-c", PATH_SCRIPT)
    result = json.loads(done.stdout)
    real, fake = result["real"], result["fake"]
    tables = [row[5] for row in real["paths"]]
    assert tables == [254, 10000, 200, 10000, 200, 254], real["paths"]
    assert fake == real


@pytest.mark.parametrize("shape", ["beside-the-original", "behind-another-route"])
def test_a_leftover_detour_in_a_group_is_put_back_without_emptying_it(w: World, shape: str) -> None:
    """The kernel refuses a replace identical to a route behind the group's first, and a replace would
    swap the first route, not the leftover: delete (beside its original) or append-then-delete (behind)."""
    original = lab.AL2023_ROUTES[-1]
    leftover = original.replace(f"via {lab.ROUTER}", f"via {lab.NAT}")
    if shape == "beside-the-original":
        before = w.all_routes()
        w.inst.ip("route", "replace", *leftover.split())
        w.inst.ip("route", "append", *original.split())
        assert [r["gateway"] for r in w.defaults()] == [lab.NAT, lab.ROUTER]
    else:
        static = f"default via {lab.ROUTER} dev {lab.IFNAME} proto static metric 512"
        w.inst.ip("route", "del", *original.split())
        w.inst.ip("route", "append", *static.split())
        w.inst.ip("route", "append", *original.split())
        before = w.all_routes()
        w.inst.ip("route", "del", *original.split())
        w.inst.ip("route", "append", *leftover.split())
        assert [(r["gateway"], r["protocol"]) for r in w.defaults()] == [
            (lab.ROUTER, "static"),
            (lab.NAT, "dhcp"),
        ]
    code, _, err = w.run_payload(w.config())
    assert code == 0, err
    assert w.all_routes() == before
    assert err.count("no journal accounts for") == 1, err
