"""Egress `main-table`: the published trick, made exact — pins, then the main table's default route via
the NAT, and everything put back as journaled.

What it changes on the host: routes to 169.254.169.254, .253, .123 and the VPC CIDRs via the VPC router
(only those not already routed), and the main table's best default route, replaced in place by one via
the NAT. Every other process's traffic takes the NAT while the detour is in place.
"""

from __future__ import annotations

import logging
from typing import Any

from bootstrap import routes
from bootstrap.egress import Context, check_settled, forget
from bootstrap.errors import IdentityMismatch
from bootstrap.imds import Imds, ImdsError
from bootstrap.netlink import Netlink
from bootstrap.route_model import DetourPlan, RouteError
from bootstrap.state import Journal

LOG = logging.getLogger(__name__)


class MainTable:
    def __init__(self, context: Context) -> None:
        self.context = context
        identity = context.identity
        # Reads the interface and the main table; refuses (no change) what it could not put back.
        self.plan = routes.plan_detour(
            context.netlink,
            mac=identity.mac,
            subnet_cidr=identity.subnet_cidr,
            vpc_cidrs=identity.vpc_cidrs,
            nat=context.nat,
            skip_pins=context.skip_pins,
        )

    def prepare(self) -> None:
        netlink, journal, plan = self.context.netlink, self.context.journal, self.plan
        # Journaled before the first change: a run killed from here on is undone by the next one.
        journal.write({"plan": plan.to_json()})
        LOG.info("journal: %d default route(s) recorded in %s", len(plan.default_routes), journal.path)
        pinned = routes.apply_pins(netlink, plan)
        if pinned.pins != plan.pins:
            self.plan = plan = pinned
            journal.write({"plan": plan.to_json()})
        LOG.info(
            "routes: pinned %s via %s (already routed, left alone: %s)",
            ", ".join(p.dst for p in plan.pins) or "nothing",
            plan.router,
            ", ".join(plan.kept) or "none",
        )
        netlink.replace(plan.detour)
        LOG.info("routes: default route now via NAT %s (metric %d)", plan.nat, plan.detour.priority)
        check_settled(self._guard_identity, self._repair, IdentityMismatch)
        check_settled(self._check_path, self._repair)

    def _guard_identity(self) -> None:
        _guard_identity(self.context.imds, self.context.identity.instance_id)

    def _check_path(self) -> None:
        src = routes.source_address(self.context.netlink, self.plan)
        routes.check_path(
            self.context.netlink,
            dst=self.context.api,
            src=src,
            expected_gateway=self.plan.nat,
            ifindex=self.plan.ifindex,
        )

    def _repair(self) -> bool:
        if not routes.assert_detour(self.context.netlink, self.plan):
            return False
        LOG.warning("routes: the detour or its pins were changed under the run (a lease renewal?); put back")
        return True

    def before_call(self) -> None:
        if self._repair():
            check_settled(self._check_path, self._repair)

    def adopt(self, client: object) -> None:
        """Nothing to do: every connection takes the main table's default route."""

    def undo(self) -> None:
        journal = self.context.journal
        try:
            routes.restore(self.context.netlink, self.plan)
        except RouteError as err:
            LOG.error("restore: %s; journal kept at %s for the next run", err, journal.path)
            raise
        forget(journal)
        LOG.info("routes: restored as journaled; journal removed")

    def plan_lines(self) -> list[str]:
        plan = self.plan
        lines = [f"would journal to {self.context.journal.path}:"]
        lines += [f"  default route now: {r.describe()}" for r in plan.default_routes] or [
            "  no default route"
        ]
        lines += [f"would add pin: {p.describe()}" for p in plan.pins] or ["would add no pin (all present)"]
        lines.append(f"would replace the default route by: {plan.detour.describe()}")
        lines.append(f"would check IMDS still answers as {self.context.identity.instance_id}")
        lines.append(f"would check the API connection to {self.context.api} leaves via {plan.nat}")
        return lines


def recover(netlink: Netlink, journal: Journal, document: dict[str, Any]) -> None:
    """Put back the main table a killed `main-table` run journaled."""
    plan = DetourPlan.from_json(document)
    LOG.warning(
        "recover: a previous run left a detour via %s (journal %s); restoring it first",
        plan.nat,
        journal.path,
    )
    routes.restore(netlink, plan)
    LOG.info("recover: routes restored as journaled")


def _guard_identity(imds: Imds, expected: str) -> None:
    """IMDS must still be this instance's: without the pin, the NAT's IMDS answers (the published bug)."""
    try:
        seen = imds.instance_id()
    except ImdsError as err:
        raise IdentityMismatch(
            f"imds: no answer during the detour ({err}); is the 169.254.169.254 pin in place?"
        ) from None
    if seen != expected:
        raise IdentityMismatch(
            f"imds: instance-id during the detour is {seen}, expected {expected}: "
            "IMDS is answering through the NAT (169.254.169.254 not pinned); restoring"
        )
    LOG.info("imds: still %s during the detour", seen)
