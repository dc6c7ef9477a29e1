"""The detour's decisions: plan the pins and the detour, keep them in place, put the main table back."""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Callable, Optional

from bootstrap.errors import ConfigError, TransientError
from bootstrap.netlink import Netlink
from bootstrap.route_model import (
    DEFAULT,
    FR_ACT_TO_TBL,
    MAIN_TABLE,
    RTN_UNICAST,
    RTPROT_STATIC,
    DetourPlan,
    PathLookup,
    Route,
    RouteError,
    table_name,
)

LOG = logging.getLogger(__name__)

# The link-local services that must keep answering for *this* instance during the detour: through the
# NAT they would be the NAT's own (IMDS would hand out its identity and credentials).
LINK_LOCAL_PINS = {
    "imds": "169.254.169.254/32",
    "dns": "169.254.169.253/32",
    "time": "169.254.169.123/32",
}
PIN_NAMES = ("imds", "dns", "time", "vpc")


class DetourBypassed(TransientError):
    """The kernel would send the API connection another way than through the NAT (a rule or a route)."""


def vpc_router(subnet_cidr: str) -> str:
    """The VPC router is the subnet's base address + 1 (AWS reserves it in every subnet)."""
    return str(ipaddress.IPv4Network(subnet_cidr).network_address + 1)


def _defaults(routes: Iterable[Route]) -> list[Route]:
    return sorted((r for r in routes if r.dst == DEFAULT and r.type == RTN_UNICAST), key=lambda r: r.priority)


def plan_detour(
    netlink: Netlink,
    *,
    mac: str,
    subnet_cidr: str,
    vpc_cidrs: Sequence[str],
    nat: str,
    skip_pins: Iterable[str] = (),
) -> DetourPlan:
    """Read the interface and the main table; decide the pins and the detour route. Changes nothing."""
    ifindex = netlink.link_index(mac)
    if ifindex is None:
        raise RouteError(f"routes: no interface with MAC {mac} (the one IMDS names)")
    if ipaddress.IPv4Address(nat) not in ipaddress.IPv4Network(subnet_cidr):
        raise ConfigError(
            f"config: nat_by_subnet: NAT {nat} is not inside this instance's subnet {subnet_cidr}"
        )
    router = vpc_router(subnet_cidr)
    table = netlink.routes(MAIN_TABLE)
    existing = {r.dst for r in table}
    skip = set(skip_pins)
    wanted = [dst for name, dst in LINK_LOCAL_PINS.items() if name not in skip]
    if "vpc" not in skip:
        wanted += [str(ipaddress.IPv4Network(c)) for c in vpc_cidrs]
    unique = list(dict.fromkeys(wanted))
    pins = tuple(
        Route(dst=dst, gateway=router, oif=ifindex, proto=RTPROT_STATIC)
        for dst in unique
        if dst not in existing
    )
    kept = tuple(dst for dst in unique if dst in existing)
    defaults = _defaults(table)
    for route in defaults:
        if route.gateway == nat:
            raise RouteError(
                f"routes: default route {route.describe()} already goes via the NAT: it is a detour, not "
                "the original to journal; no change made"
            )
        if route.unsupported:
            raise RouteError(
                f"routes: default route {route.describe()} has {', '.join(route.unsupported)}, which this "
                "payload could not put back exactly; no change made"
            )
    if defaults:
        best = defaults[0]
        # Same key (dst, table, metric) so the kernel replaces it in place; same protocol, source and
        # flags so nothing else changes. The source only makes sense on the interface it belongs to.
        detour = replace(
            best, gateway=nat, oif=ifindex, prefsrc=best.prefsrc if best.oif == ifindex else None
        )
    else:
        detour = Route(dst=DEFAULT, gateway=nat, oif=ifindex, proto=RTPROT_STATIC)
    return DetourPlan(ifindex, router, nat, tuple(defaults), detour, pins, kept)


def repair_leftover_detour(netlink: Netlink, *, nats: Iterable[str]) -> list[Route]:
    """Put a default route via a NAT back via the VPC router; return the routes put back.

    With its journal gone (removed, or /run lost), a detour is not recognised as one: the next run would
    journal it as the original and "restore" it, and the instance's replies to its Elastic IP would leave
    through the NAT. A default route via a NAT of this configuration is never the instance's own, so it
    gets the router as gateway, with everything else (protocol, source, metric, route metrics) kept.
    This runs before IMDS is read (through the NAT, IMDS answers with the NAT's identity), so the router
    is found from the interface: base + 1 of its subnet that holds the NAT.
    The table is never without a default route: the NAT route is swapped in place, or the router route
    is appended before the NAT one is deleted.
    """
    nat_addresses = set(nats)
    repaired: list[Route] = []
    while True:
        defaults = _defaults(netlink.routes(MAIN_TABLE))
        leftover = next((r for r in defaults if r.gateway in nat_addresses), None)
        if leftover is None:
            return repaired
        router = _router_for(netlink, leftover)
        fixed = replace(leftover, gateway=router)
        if fixed in repaired:
            raise RouteError(f"routes: {leftover.describe()} is still there after it was put back")
        LOG.warning(
            "routes: %s is a detour via a NAT that no journal accounts for; putting it back via the VPC "
            "router %s",
            leftover.describe(),
            router,
        )
        group = [r for r in defaults if _same_key(r, leftover)]
        if fixed in group:
            netlink.delete(leftover)
        elif group[0] == leftover:
            netlink.replace(fixed)
        else:
            # A replace would swap the group's first route, which is not the leftover.
            netlink.append(fixed)
            netlink.delete(leftover)
        repaired.append(fixed)


def _router_for(netlink: Netlink, route: Route) -> str:
    """The VPC router of the subnet that holds the route's gateway, on the route's interface."""
    gateway = ipaddress.IPv4Address(route.gateway)
    for address in netlink.addresses(route.oif) if route.oif is not None else []:
        network = ipaddress.IPv4Interface(address).network
        if gateway in network:
            return vpc_router(str(network))
    raise RouteError(
        f"routes: {route.describe()} goes via a NAT, but no address of its interface is in the NAT's "
        "subnet, so the VPC router to put it back on is unknown; no change made"
    )


def apply_pins(netlink: Netlink, plan: DetourPlan) -> DetourPlan:
    """Add the planned pins; return the plan with only the pins this run really added."""
    added = []
    for pin in plan.pins:
        try:
            netlink.add(pin)
        except RouteError as err:
            if getattr(err.__cause__, "code", None) != errno.EEXIST:
                raise
            # Someone else's route appeared since the plan was made: it is theirs, never to be removed.
            LOG.info("routes: %s appeared meanwhile; left alone", pin.dst)
            continue
        added.append(pin)
    return replace(
        plan, pins=tuple(added), kept=plan.kept + tuple(p.dst for p in plan.pins if p not in added)
    )


def _same_key(a: Route, b: Route) -> bool:
    """Same IPv4 route key (table, dst, metric): the kernel keeps such routes in one ordered group."""
    return (a.table, a.dst, a.priority) == (b.table, b.dst, b.priority)


def _via_nat(route: Route, plan: DetourPlan) -> bool:
    return route.gateway == plan.nat and route.oif == plan.ifindex


def assert_detour(netlink: Netlink, plan: DetourPlan) -> bool:
    """Put the detour and the pins (back) in place; True if anything had to be (a lease renewal's work).

    The kernel keeps routes of one (dst, metric) in an ordered group and uses the first; for default
    routes it may also move on to a later one of the same metric when the first gateway's neighbour
    looks dead (fib_select_default). A DHCP client re-adds its route in one of two ways:
    - replace (NLM_F_REPLACE): the detour is swapped out; it is replaced back, atomically;
    - append (NLM_F_CREATE|NLM_F_APPEND, sd-netlink's default): the original sits *beside* the detour.
      The detour is first then, but not the only candidate, so API traffic could leave by the VPC router.
      The copy is deleted: it is identical to the journaled route the detour replaced, so the restore
      puts it back exactly (and the detour remains meanwhile: never a moment without a default route).
    Other routes (same-metric default routes that existed before the run, a route this run did not
    journal) are someone else's and left alone; one ahead of the detour is logged.

    The pins come first: a DHCP client that flushes and re-adds its routes on a lease renewal takes them
    away too, and without them IMDS, DNS and time would answer through the NAT.
    """
    detour = plan.detour
    replaced = plan.default_routes[0] if plan.default_routes else None

    def group() -> list[Route]:
        return [r for r in _defaults(netlink.routes(MAIN_TABLE)) if _same_key(r, detour)]

    changed = _reassert_pins(netlink, plan)
    if detour not in group():
        # Not present: the replace swaps the group's first route (or adds the detour to an empty group);
        # no EEXIST, since no identical route is in the group.
        netlink.replace(detour)
        changed = True
    if replaced is not None and replaced != detour:
        for route in group():
            if route == replaced:
                netlink.delete(route)
                changed = True
    best = _defaults(netlink.routes(MAIN_TABLE))
    if best and best[0] != detour:
        LOG.warning("routes: %s is ahead of the detour and not this run's; left alone", best[0].describe())
    return changed


def _reassert_pins(netlink: Netlink, plan: DetourPlan) -> bool:
    """Add back the pins of this run that have vanished; True if any was."""
    table = netlink.routes(MAIN_TABLE)
    changed = False
    for pin in plan.pins:
        if pin in table:
            continue
        try:
            netlink.add(pin)
        except RouteError as err:
            if getattr(err.__cause__, "code", None) != errno.EEXIST:
                raise
            # A route of the same key took its place (the DHCP client's own): theirs, left alone.
            LOG.warning("routes: pin %s vanished and another route took its place; left alone", pin.dst)
            continue
        LOG.warning("routes: pin %s had vanished during the detour; added back", pin.describe())
        changed = True
    return changed


def _restore_order(netlink: Netlink, journaled: Sequence[Route]) -> None:
    """Give the journaled routes of each (dst, metric) group their journaled order back.

    Moving a route to the end of its group is a delete and an append; moving every route after the first
    one out of place, in journaled order, sorts the group and never deletes the route that stays first.
    """
    for metric in dict.fromkeys(r.priority for r in journaled):
        wanted = [r for r in journaled if r.priority == metric]
        seen = [r for r in _defaults(netlink.routes(MAIN_TABLE)) if r in wanted]
        if seen == wanted or len(seen) != len(wanted):
            continue  # in order, or incomplete (verification reports what is missing)
        first = next(i for i, (a, b) in enumerate(zip(seen, wanted)) if a != b)
        for route in wanted[first + 1 :]:
            netlink.delete(route)
            netlink.append(route)


def differences(netlink: Netlink, plan: DetourPlan) -> list[str]:
    """How the main table differs from the journal: empty when it is as the run found it."""
    table = netlink.routes(MAIN_TABLE)
    defaults = _defaults(table)
    problems = [f"missing {r.describe()}" for r in plan.default_routes if r not in defaults]
    for metric in dict.fromkeys(r.priority for r in plan.default_routes):
        wanted = [r for r in plan.default_routes if r.priority == metric]
        seen = [r for r in defaults if r in wanted]
        if len(seen) == len(wanted) and seen != wanted:
            problems.append(f"default routes of metric {metric} not in their journaled order")
    problems += [
        f"detour still present: {r.describe()}"
        for r in defaults
        if _via_nat(r, plan) and r not in plan.default_routes
    ]
    problems += [f"pin still present: {p.describe()}" for p in plan.pins if p in table]
    return problems


def restore(netlink: Netlink, plan: DetourPlan) -> None:
    """Put the main table back as journaled, from whatever state it is in (state-based, idempotent).

    Every step is tried even when an earlier one failed (the pins are always deleted); then the table is
    compared with the journal, and RouteError is raised only if it still differs (the journal is kept).
    A journaled route already present exactly is left alone: a DHCP client may have re-added it during
    the detour, and the kernel refuses a replace of a route identical to one behind the group's first.
    """
    failures: list[str] = []

    def attempt(action: Callable[[Route], object], route: Route) -> None:
        try:
            action(route)
        except RouteError as err:
            LOG.warning("%s", err)
            failures.append(str(err))

    # 1. Journaled routes that are missing come back before any detour goes: where the detour is first in
    #    the route's group, a replace swaps it atomically (the group's order as it was); otherwise an append
    #    (NLM_F_APPEND: a same-metric sibling cannot refuse it, as it would a plain add).
    for route in plan.default_routes:
        defaults = _defaults(netlink.routes(MAIN_TABLE))
        if route in defaults:
            continue
        group = [r for r in defaults if _same_key(r, route)]
        if group and _via_nat(group[0], plan) and group[0] not in plan.default_routes:
            attempt(netlink.replace, route)
        else:
            attempt(netlink.append, route)
    # 2. Default routes via the NAT that the journal does not hold: the detour and any copy of it. Never the
    #    last default route where the journal had one (a journaled route could not come back): better the
    #    NAT than no path at all until the next run.
    defaults = _defaults(netlink.routes(MAIN_TABLE))
    others = [r for r in defaults if not _via_nat(r, plan) or r in plan.default_routes]
    for route in defaults:
        if _via_nat(route, plan) and route not in plan.default_routes:
            if plan.default_routes and not others:
                LOG.warning("routes: %s kept: it is the only default route", route.describe())
                continue
            attempt(netlink.delete, route)
    try:
        _restore_order(netlink, plan.default_routes)
    except RouteError as err:
        LOG.warning("%s", err)
        failures.append(str(err))
    # 3. Only the pins this run added (exact match), whatever happened above.
    for pin in plan.pins:
        attempt(netlink.delete, pin)
    problems = differences(netlink, plan)
    if problems:
        raise RouteError(f"routes: not restored as journaled: {'; '.join(problems + failures)}")


def source_address(netlink: Netlink, plan: DetourPlan) -> Optional[str]:
    """The primary address of the detour's interface: the detour's source, else its first IPv4 address."""
    if plan.detour.prefsrc:
        return plan.detour.prefsrc
    found = netlink.addresses(plan.ifindex)
    return found[0].split("/")[0] if found else None


def _longest_match(routes: Iterable[Route], dst: str) -> Optional[Route]:
    address = ipaddress.IPv4Address(dst)
    candidates = [r for r in routes if r.type == RTN_UNICAST and address in ipaddress.IPv4Network(r.dst)]
    # Longest prefix, then lowest metric; sorted() is stable, so the first of a group stays first.
    ranked = sorted(candidates, key=lambda r: (-ipaddress.IPv4Network(r.dst).prefixlen, r.priority))
    return ranked[0] if ranked else None


def _why(netlink: Netlink, path: PathLookup, dst: str, src: Optional[str], mark: Optional[int]) -> str:
    """The rule and the route that give the path, in `ip` words, as far as they can be told."""
    reasons = []
    rule = next(
        (
            r
            for r in netlink.rules()
            if r.action == FR_ACT_TO_TBL and r.table == path.table and r.may_match(src, mark or 0)
        ),
        None,
    )
    reasons.append(rule.describe() if rule else f"table {table_name(path.table)}")
    route = _longest_match(netlink.routes(path.table), dst)
    if route is not None:
        reasons.append(f"route {route.describe()} table {table_name(path.table)}")
    return "; ".join(reasons)


def check_path(
    netlink: Netlink,
    *,
    dst: str,
    src: Optional[str],
    mark: Optional[int] = None,
    expected_gateway: str,
    ifindex: int,
) -> None:
    """Ask the kernel which next hop the API connection takes; raise DetourBypassed unless the expected one.

    A source rule ahead of main (amazon-ec2-net-utils' per-interface tables, an operator's), more
    specific routes (a VPN's 0.0.0.0/1 and 128.0.0.0/1) or a mark rule can send the connection another
    way than the detour: then every attempt would time out until the deadline. `mark` is for strategies
    that mark their sockets.
    """
    try:
        path = netlink.route_get(dst, src=src, mark=mark)
    except RouteError as err:
        raise DetourBypassed(
            f"routes: the API connection to {dst} has no route ({err}), not the NAT {expected_gateway}; "
            "restoring"
        ) from None
    if path.gateway == expected_gateway and path.oif == ifindex:
        LOG.info(
            "routes: the API connection to %s leaves via %s (table %s)",
            dst,
            expected_gateway,
            table_name(path.table),
        )
        return
    where = f"via {path.gateway}" if path.gateway else "directly (no gateway)"
    if path.oif != ifindex:
        where += f" on interface index {path.oif}"
    raise DetourBypassed(
        f"routes: the API connection to {dst} would leave {where} ({_why(netlink, path, dst, src, mark)}), "
        f"not the NAT {expected_gateway}; restoring"
    )
