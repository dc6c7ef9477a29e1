"""The kernel adapter: the netlink operations the egress needs, and pyroute2's implementation of them."""

from __future__ import annotations

import errno
from typing import Any, Optional, Protocol

from bootstrap.route_model import (
    ALL_BITS,
    FIB_RULE_INVERT,
    FR_ACT_TO_TBL,
    PathLookup,
    Route,
    RouteError,
    Rule,
    metric_value,
)

AF_INET = 2
# The only rtm_flags bit that describes a route rather than a dump: a gateway taken as on-link.
RTNH_F_ONLINK = 4
# RTM_GETROUTE: have the answer name the table the route was found in (without it, it always says main).
RTM_F_LOOKUP_TABLE = 0x1000
UNSUPPORTED_ATTRIBUTES = ("RTA_MULTIPATH", "RTA_NH_ID", "RTA_ENCAP", "RTA_VIA")


class Netlink(Protocol):
    """The few netlink operations the detour needs (pyroute2 on a host, a fake in unit tests)."""

    def link_index(self, mac: str) -> Optional[int]: ...

    def routes(self, table: int) -> list[Route]: ...

    def add(self, route: Route) -> None: ...

    def append(self, route: Route) -> None: ...

    def replace(self, route: Route) -> None: ...

    def delete(self, route: Route) -> bool: ...

    def addresses(self, ifindex: int) -> list[str]:
        """The interface's IPv4 addresses as address/prefix length, primary first."""
        ...

    def route_get(self, dst: str, src: Optional[str] = None, mark: Optional[int] = None) -> PathLookup:
        """The path the kernel would give a connection to `dst` made here (`ip route get`)."""
        ...

    def rules(self) -> list[Rule]:
        """The IPv4 routing rules, by priority."""
        ...

    def add_rule(self, rule: Rule) -> None:
        """Add an fwmark rule to a table (the policy-route egress's only kind)."""
        ...

    def delete_rule(self, rule: Rule) -> bool:
        """Delete a rule like `rule` (priority, table, mark); False if there was none."""
        ...


# Rule selectors the path check does not evaluate, and their `ip rule` words.
_RULE_SELECTORS = (
    ("FRA_IIFNAME", "iif"),
    ("FRA_OIFNAME", "oif"),
    ("FRA_UID_RANGE", "uidrange"),
    ("FRA_IP_PROTO", "ipproto"),
    ("FRA_SPORT_RANGE", "sport"),
    ("FRA_DPORT_RANGE", "dport"),
    ("FRA_L3MDEV", "l3mdev"),
)


class PyRoute2Netlink:
    """Netlink through pyroute2's IPRoute in the current network namespace."""

    def __init__(self, ipr: Any) -> None:
        self._ipr = ipr

    def link_index(self, mac: str) -> Optional[int]:
        found = self._ipr.link_lookup(address=mac.lower())
        return int(found[0]) if found else None

    def routes(self, table: int) -> list[Route]:
        result = []
        for msg in self._ipr.get_routes(family=AF_INET, table=table):
            metrics = msg.get("RTA_METRICS")
            result.append(
                Route(
                    dst=f"{msg.get('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}",
                    gateway=msg.get("RTA_GATEWAY"),
                    oif=msg.get("RTA_OIF"),
                    priority=msg.get("RTA_PRIORITY") or 0,
                    proto=msg["proto"],
                    scope=msg["scope"],
                    prefsrc=msg.get("RTA_PREFSRC"),
                    table=msg.get("RTA_TABLE") or msg["table"],
                    type=msg["type"],
                    flags=msg["flags"] & RTNH_F_ONLINK,
                    metrics=tuple((str(k), metric_value(v)) for k, v in metrics["attrs"]) if metrics else (),
                    unsupported=tuple(a for a in UNSUPPORTED_ATTRIBUTES if msg.get(a) is not None),
                )
            )
        return result

    def addresses(self, ifindex: int) -> list[str]:
        found = self._ipr.get_addr(family=AF_INET, index=ifindex)
        return [f"{m.get('IFA_LOCAL') or m.get('IFA_ADDRESS')}/{m['prefixlen']}" for m in found]

    def route_get(self, dst: str, src: Optional[str] = None, mark: Optional[int] = None) -> PathLookup:
        from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415 (imported with pyroute2)

        spec: dict[str, Any] = {"dst": dst, "flags": RTM_F_LOOKUP_TABLE}
        if src is not None:
            spec["src"] = src
        if mark is not None:
            spec["mark"] = mark
        try:
            msg = self._ipr.route("get", **spec)[0]
        except NetlinkError as err:
            raise RouteError(f"routes: get {dst}: {err}") from err
        return PathLookup(
            gateway=msg.get("RTA_GATEWAY"),
            oif=msg.get("RTA_OIF"),
            table=msg.get("RTA_TABLE") or msg["table"],
            prefsrc=msg.get("RTA_PREFSRC") or msg.get("RTA_SRC"),
        )

    def rules(self) -> list[Rule]:
        result = []
        for msg in self._ipr.get_rules(family=AF_INET):
            other = [
                f"{word} {msg.get(attr)}"
                for attr, word in _RULE_SELECTORS
                if msg.get(attr) not in (None, "", 0)
            ]
            if msg["dst_len"]:
                other.insert(0, f"to {msg.get('FRA_DST')}/{msg['dst_len']}")
            if msg["tos"]:
                other.append(f"tos {msg['tos']:#x}")
            fwmark, fwmask = msg.get("FRA_FWMARK"), msg.get("FRA_FWMASK")
            if fwmark is None and fwmask is not None:
                fwmark = 0  # `fwmark 0/MASK`: the kernel leaves out a mark of 0, not its mask
            result.append(
                Rule(
                    priority=msg.get("FRA_PRIORITY") or 0,
                    table=msg.get("FRA_TABLE") or msg["table"],
                    src=f"{msg.get('FRA_SRC')}/{msg['src_len']}" if msg["src_len"] else None,
                    fwmark=fwmark,
                    fwmask=ALL_BITS if fwmask is None else fwmask,
                    action=msg["action"],
                    invert=bool(msg["flags"] & FIB_RULE_INVERT),
                    other=tuple(other),
                )
            )
        return sorted(result, key=lambda r: r.priority)

    def _rule(self, command: str, rule: Rule) -> None:
        from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415 (imported with pyroute2)

        spec: dict[str, Any] = {"priority": rule.priority, "table": rule.table, "action": FR_ACT_TO_TBL}
        if rule.fwmark is not None:
            spec.update(fwmark=rule.fwmark, fwmask=rule.fwmask)
        try:
            self._ipr.rule(command, family=AF_INET, **spec)
        except NetlinkError as err:
            raise RouteError(f"routes: rule {command} {rule.describe()}: {err}") from err

    def add_rule(self, rule: Rule) -> None:
        self._rule("add", rule)

    def delete_rule(self, rule: Rule) -> bool:
        try:
            self._rule("del", rule)
        except RouteError as err:
            if getattr(err.__cause__, "code", None) in (errno.ENOENT, errno.ESRCH):
                return False
            raise
        return True

    def _spec(self, route: Route) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "dst": route.dst,
            "table": route.table,
            "priority": route.priority,
            "proto": route.proto,
            "scope": route.scope,
            "type": route.type,
            "flags": route.flags,
        }
        for key in ("gateway", "oif", "prefsrc"):
            if getattr(route, key) is not None:
                spec[key] = getattr(route, key)
        if route.metrics:
            # pyroute2 takes metrics by their RTAX_ names (the form a dump gives them in).
            spec["metrics"] = dict(route.metrics)
        return spec

    def _call(self, command: str, route: Route) -> None:
        from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415 (imported with pyroute2)

        try:
            self._ipr.route(command, **self._spec(route))
        except NetlinkError as err:
            raise RouteError(
                f"routes: {command} {route.describe()}: {err}",
            ) from err

    def add(self, route: Route) -> None:
        self._call("add", route)

    def append(self, route: Route) -> None:
        # NLM_F_CREATE|NLM_F_APPEND: after the routes of the same (dst, metric), never EEXIST for a
        # sibling that differs (only for an identical route).
        self._call("append", route)

    def replace(self, route: Route) -> None:
        self._call("replace", route)

    def delete(self, route: Route) -> bool:
        try:
            self._call("del", route)
        except RouteError as err:
            if getattr(err.__cause__, "code", None) == errno.ESRCH:
                return False
            raise
        return True
