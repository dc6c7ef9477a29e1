"""Egress `policy-route` (the default): only the payload's own API connections take the NAT.

What it changes on the host: one rule, `fwmark 0xe1b0 lookup 57776` at priority 100, and one route in
that private table, `default via <NAT> dev <primary> proto 225 src <primary address>`. The protocol
(route_model.RTPROT_EIP_RECLAIM) is what makes a route of that table the payload's: it removes only
those, and leaves any other route in the table (an operator's, another tool's) alone. The main table
is never written, so nothing else on the host is detoured, IMDS, DNS and time never leave the VPC path
(no pins), and a DHCP client rewriting the main table cannot undo the detour. The payload marks the
sockets of its API clients (SO_MARK; the payload holds CAP_NET_ADMIN). Priority 100 is ahead of any
source rule (amazon-ec2-net-utils installs its per-interface rules from 10000, operators' own usually
sit higher still), so a source rule cannot take the marked connection elsewhere; the kernel is asked
anyway.

Both are journaled before they exist. After a SIGKILL they stay, but match nothing (no socket carries
the mark once the payload is gone), and the next run removes them.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any, Optional

from bootstrap import routes
from bootstrap.egress import Context, check_settled, forget
from bootstrap.errors import ConfigError, TransientError
from bootstrap.netlink import Netlink
from bootstrap.route_model import DEFAULT, RTPROT_EIP_RECLAIM, Route, RouteError, Rule
from bootstrap.state import Journal

LOG = logging.getLogger(__name__)

# Ahead of every source rule in common use (amazon-ec2-net-utils: 10000 and up), behind `local` (0).
RULE_PRIORITY = 100
# A table id and mark no distribution or common tool uses ("e1b0", for EIP): easy to spot in `ip rule`.
TABLE = 0xE1B0
MARK = 0xE1B0
# Linux's SO_MARK (asm-generic/socket.h); the socket module names it only from Python 3.12.
SO_MARK = getattr(socket, "SO_MARK", 36)


@dataclass(frozen=True)
class PolicyJournal:
    """What `prepare` adds, written before it exists."""

    ifindex: int
    nat: str
    rule: Rule
    route: Route

    def to_json(self) -> dict[str, Any]:
        rule = {
            "priority": self.rule.priority,
            "table": self.rule.table,
            "fwmark": self.rule.fwmark,
            "fwmask": self.rule.fwmask,
        }
        return {"ifindex": self.ifindex, "nat": self.nat, "rule": rule, "route": self.route.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PolicyJournal:
        rule = data["rule"]
        return cls(
            ifindex=int(data["ifindex"]),
            nat=str(data["nat"]),
            rule=Rule(
                priority=int(rule["priority"]),
                table=int(rule["table"]),
                fwmark=int(rule["fwmark"]),
                fwmask=int(rule["fwmask"]),
            ),
            route=Route.from_json(data["route"]),
        )


def _is_ours(rule: Rule, journaled: Rule) -> bool:
    return (rule.priority, rule.table, rule.fwmark) == (journaled.priority, journaled.table, journaled.fwmark)


def _ours(route: Route, state: PolicyJournal) -> bool:
    """A route of the private table that this payload added: its protocol, or exactly as journaled."""
    return route.proto == RTPROT_EIP_RECLAIM or route == state.route


def _our_routes(netlink: Netlink, state: PolicyJournal) -> list[Route]:
    return [r for r in netlink.routes(state.rule.table) if _ours(r, state)]


def _remove(netlink: Netlink, state: PolicyJournal) -> list[str]:
    """Delete the rule (every copy) and the payload's routes of the private table (never another's);
    return what of them is still there."""
    for rule in netlink.rules():
        if _is_ours(rule, state.rule):
            netlink.delete_rule(rule)
    for route in _our_routes(netlink, state):
        netlink.delete(route)
    left = [r.describe() for r in netlink.rules() if _is_ours(r, state.rule)]
    return left + [r.describe() for r in _our_routes(netlink, state)]


def _in_our_place(netlink: Netlink, state: PolicyJournal) -> Optional[Route]:
    """A route of another's with the key of ours (dst, metric): a replace would overwrite it."""
    return next(
        (
            r
            for r in netlink.routes(state.rule.table)
            if (r.dst, r.priority) == (state.route.dst, state.route.priority) and not _ours(r, state)
        ),
        None,
    )


class PolicyRoute:
    def __init__(self, context: Context) -> None:
        self.context = context
        netlink, identity = context.netlink, context.identity
        ifindex = netlink.link_index(identity.mac)
        if ifindex is None:
            raise RouteError(f"routes: no interface with MAC {identity.mac} (the one IMDS names)")
        if ipaddress.IPv4Address(context.nat) not in ipaddress.IPv4Network(identity.subnet_cidr):
            raise ConfigError(
                f"config: nat_by_subnet: NAT {context.nat} is not inside this instance's subnet "
                f"{identity.subnet_cidr}"
            )
        subnet = ipaddress.IPv4Network(identity.subnet_cidr)
        primary = next(
            (
                a.split("/")[0]
                for a in netlink.addresses(ifindex)
                if ipaddress.IPv4Address(a.split("/")[0]) in subnet
            ),
            None,
        )
        if primary is None:
            raise RouteError(f"routes: interface index {ifindex} has no address in {identity.subnet_cidr}")
        self.src = primary
        self.state = PolicyJournal(
            ifindex=ifindex,
            nat=context.nat,
            rule=Rule(priority=RULE_PRIORITY, table=TABLE, fwmark=MARK),
            route=Route(
                dst=DEFAULT,
                gateway=context.nat,
                oif=ifindex,
                prefsrc=primary,
                table=TABLE,
                proto=RTPROT_EIP_RECLAIM,
            ),
        )

    def prepare(self) -> None:
        netlink, journal, state = self.context.netlink, self.context.journal, self.state
        # A rule or routes of ours with no journal (the journal was removed, /run lost): they would be
        # journaled as nothing. Only routes with this payload's protocol are its own.
        left = [r for r in netlink.rules() if _is_ours(r, state.rule)] + _our_routes(netlink, state)
        if left:
            LOG.warning(
                "routes: %s left by an earlier run with no journal; removing it first",
                "; ".join(x.describe() for x in left),
            )
            _remove(netlink, state)
        foreign = _in_our_place(netlink, state)
        if foreign is not None:
            raise RouteError(
                f"routes: table {TABLE} holds {foreign.describe()}, which is not this payload's "
                f"(protocol {RTPROT_EIP_RECLAIM}); no change made"
            )
        journal.write({"policy": state.to_json()})
        LOG.info("journal: rule %d and table %d recorded in %s", RULE_PRIORITY, TABLE, journal.path)
        netlink.replace(state.route)
        netlink.add_rule(state.rule)
        LOG.info(
            "routes: API connections marked %#x look up table %d: default via NAT %s (main table untouched)",
            MARK,
            TABLE,
            state.nat,
        )
        check_settled(self._check_path, self._repair)

    def _check_path(self) -> None:
        routes.check_path(
            self.context.netlink,
            dst=self.context.api,
            src=self.src,
            mark=MARK,
            expected_gateway=self.state.nat,
            ifindex=self.state.ifindex,
        )

    def before_call(self) -> None:
        if self._repair():
            check_settled(self._check_path, self._repair)

    def _repair(self) -> bool:
        """Put the rule and the route back if something (networkd reconfiguring) removed them."""
        netlink, state = self.context.netlink, self.state
        changed = []
        if not any(_is_ours(r, state.rule) for r in netlink.rules()):
            netlink.add_rule(state.rule)
            changed.append(state.rule.describe())
        if state.route not in netlink.routes(TABLE):
            foreign = _in_our_place(netlink, state)
            if foreign is not None:
                # Never overwritten; the path check judges where the connection now goes.
                LOG.warning(
                    "routes: %s took the place of %s; left alone", foreign.describe(), state.route.describe()
                )
            else:
                netlink.replace(state.route)
                changed.append(state.route.describe())
        if changed:
            LOG.warning("routes: %s had gone; put back", "; ".join(changed))
        return bool(changed)

    def adopt(self, client: object) -> None:
        mark_connections(client, MARK)

    def undo(self) -> None:
        journal = self.context.journal
        left = _remove(self.context.netlink, self.state)
        if left:
            LOG.error(
                "restore: still present: %s; journal kept at %s for the next run",
                "; ".join(left),
                journal.path,
            )
            raise RouteError(f"routes: not removed: {'; '.join(left)}")
        forget(journal)
        LOG.info("routes: rule %d and table %d removed; journal removed", RULE_PRIORITY, TABLE)

    def plan_lines(self) -> list[str]:
        state = self.state
        return [
            f"would journal to {self.context.journal.path}, then add:",
            f"  {state.rule.describe()}",
            f"  {state.route.describe()} table {TABLE}",
            "would change nothing in the main table (no pins: IMDS, DNS and time stay on the VPC path)",
            f"would check the API connection to {self.context.api} marked {MARK:#x} leaves via {state.nat}",
        ]


def recover(netlink: Netlink, journal: Journal, document: dict[str, Any]) -> None:
    """Remove the rule and table a killed `policy-route` run journaled."""
    state = PolicyJournal.from_json(document)
    LOG.warning(
        "recover: a previous run left rule %d and table %d (journal %s); removing them",
        state.rule.priority,
        state.rule.table,
        journal.path,
    )
    left = _remove(netlink, state)
    if left:
        raise RouteError(f"routes: not removed: {'; '.join(left)}")
    LOG.info("recover: rule and table removed")


def mark_connections(client: object, mark: int) -> None:
    """Make every connection `client` opens carry `mark` (SO_MARK), so the policy rule takes it.

    botocore has no public setting for socket options. Its HTTP session hands urllib3 one list of
    options for every connection it makes (`client._endpoint.http_session._socket_options`, shared by
    reference with the pool manager); the mark is added to that list before the first request. These are
    private attributes of the pinned botocore: tests/unit/test_bootstrap_egress.py holds them in place,
    and a botocore without them stops the run here, in one line, rather than detour nothing.
    """
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    options = getattr(session, "_socket_options", None)
    if not isinstance(options, list):
        raise TransientError(
            "egress: this botocore keeps no socket options where the payload sets SO_MARK "
            "(client._endpoint.http_session._socket_options); use egress main-table"
        )
    option = (socket.SOL_SOCKET, SO_MARK, mark)
    if option not in options:
        options.append(option)
