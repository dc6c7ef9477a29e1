"""How the instance reaches the API before it holds its address: one module a strategy, one interface.

- `policy-route` (default, policy_route.py): an fwmark rule ahead of any source rule into a private
  table whose default route is via the NAT; only the payload's marked sockets take it.
- `main-table` (main_table.py): pins via the VPC router, then the main table's default route via the NAT.
- `direct` (direct.py): nothing; the API is reachable as routed (IPv6, interface endpoints).

The run calls `prepare()` (journal first, then the change, then the kernel's word on the API's path),
`before_call()` before every API attempt (put back what DHCP or networkd took away), `adopt(client)` on
every API client made while the egress is in place, and `undo()` in a `finally`; `recover()` undoes
what a killed run journaled, whichever strategy wrote it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

from bootstrap.errors import TransientError
from bootstrap.imds import Identity, Imds
from bootstrap.netlink import Netlink
from bootstrap.routes import DetourBypassed
from bootstrap.state import Journal

LOG = logging.getLogger(__name__)

POLICY_ROUTE = "policy-route"
MAIN_TABLE = "main-table"
DIRECT = "direct"
KINDS = (POLICY_ROUTE, MAIN_TABLE, DIRECT)
# Strategies that detour through the NAT of the instance's subnet (and so need `nat_by_subnet`).
VIA_NAT = (POLICY_ROUTE, MAIN_TABLE)


class Egress(Protocol):
    """One strategy's changes to the host, from `prepare` to `undo`."""

    def prepare(self) -> None: ...

    def before_call(self) -> None: ...

    def adopt(self, client: object) -> None: ...

    def undo(self) -> None: ...

    def plan_lines(self) -> list[str]:
        """What `prepare` would do, for --dry-run."""
        ...


@dataclass(frozen=True)
class Context:
    """What a strategy works with: the host's netlink, the journal, IMDS and where the API is."""

    netlink: Netlink
    journal: Journal
    imds: Imds
    identity: Identity
    nat: str
    # The API's IPv4 address, resolved before any change: the kernel is asked how it is reached.
    api: str
    skip_pins: frozenset[str] = frozenset()


def open_egress(kind: str, context: Context) -> Egress:
    """The strategy `kind` for this instance; reads the host, changes nothing yet."""
    if kind == MAIN_TABLE:
        from bootstrap.egress.main_table import MainTable  # noqa: PLC0415

        return MainTable(context)
    if kind == POLICY_ROUTE:
        from bootstrap.egress.policy_route import PolicyRoute  # noqa: PLC0415

        return PolicyRoute(context)
    raise ValueError(f"egress {kind!r} does not change the host")


def recover(netlink: Netlink, journal: Journal) -> bool:
    """Undo what an interrupted (killed) run journaled, whichever strategy; True if there was anything."""
    document = journal.read()
    if document is None:
        return False
    if "policy" in document:
        from bootstrap.egress import policy_route  # noqa: PLC0415

        policy_route.recover(netlink, journal, document["policy"])
    else:
        from bootstrap.egress import main_table  # noqa: PLC0415

        main_table.recover(netlink, journal, document["plan"])
    journal.delete()
    return True


def check_journal(journal: Journal) -> None:
    """A journal of the right version that this payload cannot read: exit 75, kept for an operator."""
    document = journal.read()
    if document is None:
        return
    try:
        if "policy" in document:
            from bootstrap.egress.policy_route import PolicyJournal  # noqa: PLC0415

            PolicyJournal.from_json(document["policy"])
        else:
            from bootstrap.route_model import DetourPlan  # noqa: PLC0415

            DetourPlan.from_json(document["plan"])
    except (KeyError, TypeError, ValueError) as err:
        raise TransientError(
            f"journal: {journal.path}: malformed plan ({type(err).__name__}: {err}); inspect and remove it"
        ) from None


def check_settled(
    check: Callable[[], None],
    repair: Callable[[], bool],
    failure: type[Exception] = DetourBypassed,
) -> None:
    """Run a check of the detour (the kernel's word on the API's path, IMDS's identity); when it fails
    with `failure` and `repair` put anything back, run it once more.

    A lease renewal (networkd's DHCP route, a flush of the pins, its cleanup of foreign rules) can land
    between the change and the check as easily as between two calls: the race is not a bypass. A failure
    that survives the repair (a source rule, a VPN's half routes, a pin the run could not add) is real,
    and stops the run.
    """
    try:
        check()
    except failure:
        if not repair():
            raise
        check()


def forget(journal: Journal) -> None:
    """Delete the journal once the host is as it was; a failure costs nothing but a no-op recovery."""
    try:
        journal.delete()
    except OSError as err:
        LOG.warning(
            "journal: cannot remove %s: %s; the next run finds the routes already restored", journal.path, err
        )
