"""The route and rule model: IPv4 routes and rules as the payload reads, journals and compares them."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from bootstrap.errors import TransientError

MAIN_TABLE = 254
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RTPROT_STATIC = 4
# The protocol of the routes this payload adds to its private table (`ip route show proto 225`): only
# routes with it are the payload's to delete. The kernel does not interpret values above RTPROT_STATIC;
# 225 (0xe1, "e1" as the table and mark 0xe1b0) is named by none of the kernel's rtnetlink.h (up to 192,
# eigrp), iproute2's rt_protos (up to 192), FRR's rt_protos.d (186-198), and is not among what
# systemd-networkd and NetworkManager write (kernel, boot, static, ra, dhcp).
RTPROT_EIP_RECLAIM = 0xE1
# rtnetlink protocol numbers as `ip route` names them (rt_protos), for log lines.
PROTOCOL_NAMES = {
    2: "kernel",
    3: "boot",
    4: "static",
    16: "dhcp",
    18: "keepalived",
    186: "bgp",
    RTPROT_EIP_RECLAIM: "eip-reclaim",
}
# Routing rules: the action "lookup TABLE", and the `not` flag.
FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 2
ALL_BITS = 0xFFFFFFFF
TABLE_NAMES = {255: "local", 254: "main", 253: "default"}

DEFAULT = "0.0.0.0/0"
# A route metric's value: a number, except RTAX_CC_ALGO (`congctl cubic`), which the kernel gives by name.
MetricValue = Union[int, str]


class RouteError(TransientError):
    """The kernel refused a route change."""


def table_name(table: int) -> str:
    return TABLE_NAMES.get(table, str(table))


@dataclass(frozen=True)
class Route:
    """One IPv4 route, with every attribute needed to put it back as it was."""

    dst: str
    gateway: Optional[str] = None
    oif: Optional[int] = None
    priority: int = 0
    proto: int = RTPROT_STATIC
    scope: int = RT_SCOPE_UNIVERSE
    prefsrc: Optional[str] = None
    table: int = MAIN_TABLE
    type: int = RTN_UNICAST
    flags: int = 0
    metrics: tuple[tuple[str, MetricValue], ...] = field(default=())
    # Attributes this payload cannot write back (multipath next hops, nexthop objects, encapsulation):
    # such a route is never replaced, because it could not be restored exactly.
    unsupported: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """The route in `ip route` words (the interface by index: names are not journaled)."""
        via = f" via {self.gateway}" if self.gateway else ""
        src = f" src {self.prefsrc}" if self.prefsrc else ""
        proto = PROTOCOL_NAMES.get(self.proto, str(self.proto))
        return f"{self.dst}{via} dev index {self.oif} proto {proto}{src} metric {self.priority}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["metrics"] = [list(item) for item in self.metrics]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Route:
        values = dict(data)
        values["metrics"] = tuple(
            (str(name), metric_value(value)) for name, value in values.get("metrics", ())
        )
        values["unsupported"] = tuple(str(name) for name in values.get("unsupported", ()))
        return cls(**values)


@dataclass(frozen=True)
class Rule:
    """One IPv4 routing rule, as far as the path check needs it (`ip rule` words in `describe`)."""

    priority: int
    table: int
    src: Optional[str] = None  # a prefix; None: from all
    fwmark: Optional[int] = None
    fwmask: int = ALL_BITS
    action: int = FR_ACT_TO_TBL
    invert: bool = False
    # Selectors this payload does not evaluate (iif, oif, to, uidrange, ports...), in `ip rule` words.
    other: tuple[str, ...] = ()

    def may_match(self, src: Optional[str], mark: int) -> bool:
        """Whether a locally made connection from `src` with `mark` matches (unevaluated selectors: yes)."""
        if self.other:
            return True
        hit = True
        if self.src is not None:
            hit = src is not None and ipaddress.IPv4Address(src) in ipaddress.IPv4Network(self.src)
        if self.fwmark is not None:
            hit = hit and (mark ^ self.fwmark) & self.fwmask == 0
        return hit != self.invert

    def describe(self) -> str:
        words = ["not"] if self.invert else []
        source = self.src[:-3] if self.src and self.src.endswith("/32") else self.src
        words += ["from", source or "all"]
        if self.fwmark is not None:
            words += [
                "fwmark",
                f"{self.fwmark:#x}" + (f"/{self.fwmask:#x}" if self.fwmask != ALL_BITS else ""),
            ]
        words += list(self.other)
        words += (
            ["lookup", table_name(self.table)] if self.action == FR_ACT_TO_TBL else [f"action {self.action}"]
        )
        return f"rule {self.priority}: {' '.join(words)}"


@dataclass(frozen=True)
class PathLookup:
    """The kernel's answer to "which way would a connection to dst go" (RTM_GETROUTE)."""

    gateway: Optional[str]
    oif: Optional[int]
    table: int
    # The source address the connection would use.
    prefsrc: Optional[str] = None


def metric_value(value: Any) -> MetricValue:
    """A metric as journaled and compared: the congestion control by name, every other one a number."""
    return value if isinstance(value, str) else int(value)


@dataclass(frozen=True)
class DetourPlan:
    """What a detour changes, written to the journal before the first change."""

    ifindex: int
    router: str
    nat: str
    # The main table's default routes as found; empty when there was none.
    default_routes: tuple[Route, ...]
    # The route that replaces the best default route while the detour is in place.
    detour: Route
    # Pins this run adds (never ones that already existed); only these are removed afterwards.
    pins: tuple[Route, ...]
    # Destinations that already had a route and are left alone (for the log; not journaled).
    kept: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "ifindex": self.ifindex,
            "router": self.router,
            "nat": self.nat,
            "default_routes": [r.to_json() for r in self.default_routes],
            "detour": self.detour.to_json(),
            "pins": [r.to_json() for r in self.pins],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DetourPlan:
        return cls(
            ifindex=int(data["ifindex"]),
            router=str(data["router"]),
            nat=str(data["nat"]),
            default_routes=tuple(Route.from_json(r) for r in data["default_routes"]),
            detour=Route.from_json(data["detour"]),
            pins=tuple(Route.from_json(r) for r in data["pins"]),
        )
