"""restore and assert_detour against the kernel-like fake: state-based, complete, idempotent."""

from __future__ import annotations

import errno
import json
from dataclasses import replace

import pytest

from bootstrap import routes
from bootstrap.route_model import DetourPlan, Route, RouteError, Rule
from tests.unit.test_bootstrap_fakes import AL2023_TABLE, DHCP_DEFAULT, MAC, FakeNetlink, route_failure

NAT = "10.0.0.4"
STATIC_DEFAULT = Route(dst="0.0.0.0/0", gateway="10.0.0.1", oif=DHCP_DEFAULT.oif, priority=512)


def _detour(nl: FakeNetlink) -> DetourPlan:
    """Plan, journal-worthy, with the pins added and the detour in place: what a run has mid-detour."""
    plan = routes.plan_detour(nl, mac=MAC, subnet_cidr="10.0.0.0/24", vpc_cidrs=["10.0.0.0/16"], nat=NAT)
    plan = routes.apply_pins(nl, plan)
    nl.replace(plan.detour)
    return plan


def _defaults(nl: FakeNetlink) -> list[Route]:
    return [r for r in nl.table if r.dst == "0.0.0.0/0"]


def test_a_plain_restore_swaps_the_detour_back_in_one_replace() -> None:
    nl = FakeNetlink()
    plan = _detour(nl)
    nl.calls.clear()
    routes.restore(nl, plan)
    assert nl.table == AL2023_TABLE
    assert [c for c, r in nl.calls if r.dst == "0.0.0.0/0"] == ["replace"]


def test_an_original_appended_beside_the_detour_is_kept_and_the_detour_deleted() -> None:
    nl = FakeNetlink()
    plan = _detour(nl)
    nl.append(DHCP_DEFAULT)  # systemd-networkd's lease renewal: NLM_F_CREATE|NLM_F_APPEND
    routes.restore(nl, plan)
    assert nl.table == AL2023_TABLE
    nl.calls.clear()
    routes.restore(nl, plan)  # a second restore changes nothing
    assert [c for c, _ in nl.calls if c != "delete"] == []
    assert nl.table == AL2023_TABLE


def test_two_same_metric_default_routes_come_back_in_their_order() -> None:
    nl = FakeNetlink(table=[*AL2023_TABLE, STATIC_DEFAULT])
    plan = _detour(nl)
    assert _defaults(nl) == [plan.detour, STATIC_DEFAULT]
    routes.restore(nl, plan)
    assert _defaults(nl) == [DHCP_DEFAULT, STATIC_DEFAULT]


def test_a_swapped_group_is_put_back_in_the_journaled_order_without_emptying_it() -> None:
    nl = FakeNetlink(table=[*AL2023_TABLE, STATIC_DEFAULT])
    plan = _detour(nl)
    nl.append(DHCP_DEFAULT)  # detour, static, dhcp

    def never_empty(command: str, route: Route) -> None:
        if command == "delete" and route.dst == "0.0.0.0/0":
            assert len(_defaults(nl)) > 1, "the last default route deleted"

    nl.on_change = never_empty
    routes.restore(nl, plan)
    assert _defaults(nl) == [DHCP_DEFAULT, STATIC_DEFAULT]


def test_duplicates_of_the_detour_are_all_deleted() -> None:
    nl = FakeNetlink()
    plan = _detour(nl)
    nl.append(replace(plan.detour, proto=4))
    nl.append(replace(plan.detour, priority=1024))
    routes.restore(nl, plan)
    assert nl.table == AL2023_TABLE


def test_the_pins_are_deleted_even_when_the_default_route_cannot_come_back() -> None:
    nl = FakeNetlink()
    plan = _detour(nl)
    nl.fail_on = {"replace": errno.ENETUNREACH, "append": errno.ENETUNREACH}
    with pytest.raises(RouteError, match=r"missing 0\.0\.0\.0/0 via 10\.0\.0\.1 "):
        routes.restore(nl, plan)
    assert not [p for p in plan.pins if p in nl.table]
    # The detour is the only default route left: kept (a path via the NAT rather than none).
    assert _defaults(nl) == [plan.detour]
    nl.fail_on = {}
    routes.restore(nl, plan)
    assert nl.table == AL2023_TABLE


def test_a_failed_step_that_left_the_table_right_is_not_an_error() -> None:
    nl = FakeNetlink()
    plan = _detour(nl)
    pin = plan.pins[0]

    def gone_meanwhile(command: str, route: Route) -> None:
        if command == "delete" and route == pin:
            nl.table.remove(pin)
            raise route_failure(command, route, errno.EBUSY)

    nl.on_change = gone_meanwhile
    routes.restore(nl, plan)
    assert nl.table == AL2023_TABLE


def test_assert_detour_deletes_an_appended_original_so_the_detour_is_the_only_one() -> None:
    nl = FakeNetlink()
    plan = _detour(nl)
    assert routes.assert_detour(nl, plan) is False
    nl.append(DHCP_DEFAULT)
    assert routes.assert_detour(nl, plan) is True
    assert _defaults(nl) == [plan.detour]
    assert routes.assert_detour(nl, plan) is False


def test_assert_detour_replaces_an_original_put_back_in_its_place() -> None:
    nl = FakeNetlink()
    plan = _detour(nl)
    nl.replace(DHCP_DEFAULT)
    assert routes.assert_detour(nl, plan) is True
    assert _defaults(nl) == [plan.detour]


def test_assert_detour_leaves_a_same_metric_route_that_was_there_before() -> None:
    nl = FakeNetlink(table=[*AL2023_TABLE, STATIC_DEFAULT])
    plan = _detour(nl)
    assert routes.assert_detour(nl, plan) is False
    assert _defaults(nl) == [plan.detour, STATIC_DEFAULT]


def test_a_congestion_control_metric_is_journaled_and_restored_by_name() -> None:
    """`ip route ... congctl cubic`: RTAX_CC_ALGO is a string among the numeric metrics."""
    default = replace(DHCP_DEFAULT, metrics=(("RTAX_MTU", 1400), ("RTAX_CC_ALGO", "cubic")))
    nl = FakeNetlink(table=[default, *AL2023_TABLE[1:]])
    plan = _detour(nl)
    assert plan.detour.metrics == default.metrics
    journaled = DetourPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert journaled == plan
    routes.restore(nl, journaled)
    assert nl.table == [default, *AL2023_TABLE[1:]]


def test_assert_detour_adds_back_a_pin_that_vanished_and_the_restore_removes_it() -> None:
    nl = FakeNetlink()
    plan = _detour(nl)
    imds_pin = next(p for p in plan.pins if p.dst == "169.254.169.254/32")
    nl.delete(imds_pin)  # a DHCP client flushing its routes on a lease renewal
    assert routes.assert_detour(nl, plan) is True
    assert imds_pin in nl.table
    assert routes.assert_detour(nl, plan) is False
    routes.restore(nl, plan)
    assert nl.table == AL2023_TABLE


def test_assert_detour_leaves_a_route_that_took_a_vanished_pins_place() -> None:
    nl = FakeNetlink()
    plan = _detour(nl)
    pin = plan.pins[0]
    theirs = replace(pin, proto=16)  # same key (dst, metric 0): the kernel refuses ours (EEXIST)
    nl.delete(pin)
    nl.add(theirs)
    assert routes.assert_detour(nl, plan) is False
    routes.restore(nl, plan)
    assert nl.table == [*AL2023_TABLE, theirs]


NATS = ("10.0.0.4", "10.0.1.4")
LEFTOVER = replace(DHCP_DEFAULT, gateway=NAT, metrics=(("RTAX_MTU", 9001),))


def _repair(nl: FakeNetlink) -> list[Route]:
    return routes.repair_leftover_detour(nl, nats=NATS)


def _never_without_a_default_route(nl: FakeNetlink) -> None:
    def check(command: str, route: Route) -> None:
        if command == "delete" and route.dst == "0.0.0.0/0":
            assert len(_defaults(nl)) > 1, "the last default route deleted"

    nl.on_change = check


def test_a_leftover_detour_is_swapped_back_to_the_router_in_place(caplog: pytest.LogCaptureFixture) -> None:
    nl = FakeNetlink(table=[LEFTOVER, *AL2023_TABLE[1:]])
    _never_without_a_default_route(nl)
    fixed = replace(LEFTOVER, gateway="10.0.0.1")
    assert _repair(nl) == [fixed]
    assert nl.table == [fixed, *AL2023_TABLE[1:]]
    assert [c for c, _ in nl.calls] == ["replace"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and LEFTOVER.describe() in warnings[0]
    nl.calls.clear()
    assert _repair(nl) == []
    assert nl.calls == []


def test_a_leftover_behind_a_same_metric_route_is_appended_back_not_swapped() -> None:
    nl = FakeNetlink(table=[STATIC_DEFAULT, LEFTOVER, *AL2023_TABLE[1:]])
    _never_without_a_default_route(nl)
    _repair(nl)
    assert _defaults(nl) == [STATIC_DEFAULT, replace(LEFTOVER, gateway="10.0.0.1")]


def test_a_leftover_beside_its_original_is_deleted() -> None:
    nl = FakeNetlink(table=[LEFTOVER, replace(LEFTOVER, gateway="10.0.0.1"), *AL2023_TABLE[1:]])
    _never_without_a_default_route(nl)
    _repair(nl)
    assert _defaults(nl) == [replace(LEFTOVER, gateway="10.0.0.1")]
    assert [c for c, _ in nl.calls] == ["delete"]


def test_a_default_route_via_a_nat_is_never_journaled_as_the_original() -> None:
    nl = FakeNetlink(table=[LEFTOVER, *AL2023_TABLE[1:]])
    with pytest.raises(RouteError, match="already goes via the NAT"):
        routes.plan_detour(nl, mac=MAC, subnet_cidr="10.0.0.0/24", vpc_cidrs=["10.0.0.0/16"], nat=NAT)
    assert nl.calls == []


def test_a_leftover_whose_router_cannot_be_told_is_left_alone_with_one_line() -> None:
    nl = FakeNetlink(table=[LEFTOVER, *AL2023_TABLE[1:]])
    nl.interface_addresses = {}
    with pytest.raises(RouteError, match="VPC router to put it back on is unknown"):
        _repair(nl)
    assert nl.calls == []


API = "203.0.113.10"
SOURCE_RULE = Rule(10000, 10000, src="10.0.0.10/32")
TABLE_10000 = replace(STATIC_DEFAULT, priority=0, table=10000)


def _check(nl: FakeNetlink, mark: int | None = None) -> None:
    routes.check_path(nl, dst=API, src="10.0.0.10", mark=mark, expected_gateway=NAT, ifindex=DHCP_DEFAULT.oif)


def test_the_path_check_passes_when_the_detour_carries_the_connection() -> None:
    nl = FakeNetlink()
    plan = _detour(nl)
    assert routes.source_address(nl, plan) == "10.0.0.10"
    _check(nl)


def test_a_source_rule_ahead_of_main_is_named_when_it_bypasses_the_detour() -> None:
    nl = FakeNetlink()
    _detour(nl)
    nl.rule_list.append(SOURCE_RULE)
    nl.table.append(TABLE_10000)
    with pytest.raises(routes.DetourBypassed) as caught:
        _check(nl)
    assert str(caught.value) == (
        f"routes: the API connection to {API} would leave via 10.0.0.1 (rule 10000: from 10.0.0.10 lookup "
        f"10000; route {TABLE_10000.describe()} table 10000), not the NAT {NAT}; restoring"
    )


def test_more_specific_routes_in_main_are_named_when_they_bypass_the_detour() -> None:
    nl = FakeNetlink()
    _detour(nl)
    halves = [replace(STATIC_DEFAULT, dst=dst, priority=0) for dst in ("0.0.0.0/1", "128.0.0.0/1")]
    nl.table += halves
    with pytest.raises(
        routes.DetourBypassed, match=r"rule 32766: from all lookup main; route 128\.0\.0\.0/1 via"
    ):
        _check(nl)


def test_a_mark_rule_is_followed_only_for_marked_connections() -> None:
    nl = FakeNetlink()
    _detour(nl)
    nl.rule_list.append(Rule(100, 200, fwmark=0x5))
    nl.table.append(replace(STATIC_DEFAULT, table=200))
    _check(nl)
    with pytest.raises(routes.DetourBypassed, match="rule 100: from all fwmark 0x5 lookup 200"):
        _check(nl, mark=0x5)


def test_no_route_at_all_is_a_bypass_too() -> None:
    nl = FakeNetlink(table=[])
    with pytest.raises(routes.DetourBypassed, match="has no route"):
        _check(nl)
