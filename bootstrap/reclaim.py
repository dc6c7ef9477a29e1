"""One run: recover, read IMDS, detour via the NAT, claim the Elastic IP, restore, complete the lifecycle."""

from __future__ import annotations

import logging
import random
import socket
import urllib.parse
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Protocol, TextIO, TypeVar

from bootstrap import routes
from bootstrap.clock import Clock, Deadline
from bootstrap.config import Config
from bootstrap.errors import EXIT_OK, IdentityMismatch, ReclaimError, Terminated, TransientError
from bootstrap.imds import Credentials, Identity, Imds, ImdsError
from bootstrap.interrupts import INTERRUPTS, Interrupts
from bootstrap.routes import DetourPlan, Netlink
from bootstrap.state import Journal

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_ec2 import EC2Client

    from bootstrap.claim import Outcome

LOG = logging.getLogger(__name__)

_C = TypeVar("_C")


class Clients(Protocol):
    """What the run needs to make API clients (the real one is `aws.ClientFactory`)."""

    def ec2(self, endpoint_url: Optional[str], credentials: Optional[Credentials]) -> EC2Client: ...

    def autoscaling(
        self, endpoint_url: Optional[str], credentials: Optional[Credentials]
    ) -> AutoScalingClient: ...


@dataclass
class Deps:
    """Everything a run touches, injected so each branch can be driven by small fakes."""

    clock: Clock
    imds: Imds
    netlink: Callable[[], AbstractContextManager[Netlink]]
    clients: Clients
    journal: Journal
    interrupts: Interrupts = field(default_factory=lambda: INTERRUPTS)
    skip_pins: frozenset[str] = frozenset()
    rng: random.Random = field(default_factory=random.Random)


def recover(netlink: Netlink, journal: Journal) -> bool:
    """Restore a detour an interrupted (killed) run left behind; True if there was one."""
    document = journal.read()
    if document is None:
        return False
    plan = DetourPlan.from_json(document["plan"])
    LOG.warning(
        "recover: a previous run left a detour via %s (journal %s); restoring it first",
        plan.nat,
        journal.path,
    )
    routes.restore(netlink, plan)
    journal.delete()
    LOG.info("recover: routes restored as journaled")
    return True


def restore_and_forget(netlink: Netlink, plan: DetourPlan, journal: Journal, interrupts: Interrupts) -> None:
    """Put the routes back and delete the journal; signals from here on are only logged."""
    interrupts.disarm()
    try:
        routes.restore(netlink, plan)
    except routes.RouteError as err:
        LOG.error("restore: %s; journal kept at %s for the next run", err, journal.path)
        raise
    journal.delete()


def _check_journal(journal: Journal) -> None:
    """A journal of the right version whose plan this payload cannot read: exit 75, kept for an operator."""
    document = journal.read()
    if document is None:
        return
    try:
        DetourPlan.from_json(document["plan"])
    except (KeyError, TypeError, ValueError) as err:
        raise TransientError(
            f"journal: {journal.path}: malformed plan ({type(err).__name__}: {err}); inspect and remove it"
        ) from None


def _skip_warning(skip: frozenset[str]) -> None:
    if skip:
        LOG.warning("TEST ONLY: not adding pins %s (EIP_RECLAIM_TEST_SKIP_PINS)", ",".join(sorted(skip)))


def _claim(
    deps: Deps, config: Config, deadline: Deadline, *, ec2: EC2Client, me: str, before: Callable[[], None]
) -> Outcome:
    from bootstrap.claim import Retrier, claim  # noqa: PLC0415 (botocore loads on a background thread meanwhile)

    return claim(ec2, me, config.allocation_id, Retrier(deadline, before, deps.rng))


def _plan(deps: Deps, netlink: Netlink, identity: Identity, nat: str) -> DetourPlan:
    """The detour for this instance's interface and subnet: the same for a run and a dry run."""
    return routes.plan_detour(
        netlink,
        mac=identity.mac,
        subnet_cidr=identity.subnet_cidr,
        vpc_cidrs=identity.vpc_cidrs,
        nat=nat,
        skip_pins=deps.skip_pins,
    )


def _detour_and_claim(
    deps: Deps,
    config: Config,
    deadline: Deadline,
    *,
    identity: Identity,
    nat: str,
    creds: Optional[Credentials],
    abandon: Callable[[], None],
) -> Outcome:
    api = _api_address(config)
    with deps.netlink() as netlink:
        plan = _plan(deps, netlink, identity, nat)

        def check_path() -> None:
            src = routes.source_address(netlink, plan)
            routes.check_path(netlink, dst=api, src=src, expected_gateway=nat, ifindex=plan.ifindex)

        try:
            # Inside the try: an interrupt right after the write still restores (a no-op then) and
            # removes the journal; the first route change comes only after the write.
            deps.journal.write({"plan": plan.to_json()})
            LOG.info(
                "journal: %d default route(s) recorded in %s", len(plan.default_routes), deps.journal.path
            )
            pinned = routes.apply_pins(netlink, plan)
            if pinned.pins != plan.pins:
                plan = pinned
                deps.journal.write({"plan": plan.to_json()})
            LOG.info(
                "routes: pinned %s via %s (already routed, left alone: %s)",
                ", ".join(p.dst for p in plan.pins) or "nothing",
                plan.router,
                ", ".join(plan.kept) or "none",
            )
            netlink.replace(plan.detour)
            LOG.info("routes: default route now via NAT %s (metric %d)", nat, plan.detour.priority)
            _guard_identity(deps.imds, identity.instance_id)
            check_path()

            def before_attempt() -> None:
                if routes.assert_detour(netlink, plan):
                    LOG.warning("routes: default route was changed under the detour; detour re-asserted")
                    check_path()

            try:
                ec2 = _ec2_client(deps, config, creds)
                try:
                    return _claim(
                        deps, config, deadline, ec2=ec2, me=identity.instance_id, before=before_attempt
                    )
                finally:
                    _close_connections(ec2)
            except ReclaimError as err:
                # Through the detour, before the restore: without a public IPv4 the instance has no
                # route to the API afterwards, and the group would wait out the hook's timeout.
                if not isinstance(err, Terminated):
                    abandon()
                raise
        finally:
            restore_and_forget(netlink, plan, deps.journal, deps.interrupts)
            LOG.info("routes: restored as journaled; journal removed")


def _api_address(config: Config) -> str:
    """The EC2 endpoint's IPv4 address, resolved before the detour, for the path check."""
    host = urllib.parse.urlsplit(config.ec2_endpoint_url).hostname if config.ec2_endpoint_url else None
    host = host or f"ec2.{config.region}.amazonaws.com"
    try:
        found = socket.getaddrinfo(host, 443, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as err:
        raise TransientError(f"dns: cannot resolve the EC2 endpoint {host}: {err}") from None
    return str(found[0][4][0])


def _close_connections(client: object) -> None:
    """Close the API connections made through the NAT while the detour still carries them.

    Closed after the restore, a connection's FIN would leave by the VPC router from another source
    address, go unanswered, and hold the socket in FIN-WAIT-1 for minutes.
    """
    close = getattr(client, "close", None)  # botocore clients have it; the typing stubs omit it
    if callable(close):
        close()


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


def run(config: Config, deps: Deps, deadline: Deadline) -> int:
    """The whole run after the lock is held. Raises ReclaimError (with its exit code) on failure."""
    _skip_warning(deps.skip_pins)
    if deps.journal.exists():
        _check_journal(deps.journal)
        with deps.netlink() as netlink:
            recover(netlink, deps.journal)
    with deps.netlink() as netlink:
        routes.repair_leftover_detour(netlink, nats=config.nat_by_subnet.values())
    identity = deps.imds.identity()
    LOG.info(
        "imds: instance %s in %s (%s), VPC %s, public IPv4 %s",
        identity.instance_id,
        identity.subnet_id,
        identity.subnet_cidr,
        ",".join(identity.vpc_cidrs),
        identity.public_ipv4 or "none",
    )
    outcome: Optional[Outcome] = None
    creds: Optional[Credentials] = None
    abandoned = False  # ABANDON already tried through the detour
    try:
        nat = config.nat_for(identity.subnet_id)
        creds = deps.imds.credentials()
        LOG.info(
            "imds: %s", "role credentials read" if creds else "no instance role; default credential chain"
        )
        if identity.public_ipv4:
            # A public address means the API is reachable as things are (and if it is the Elastic IP,
            # DescribeAddresses shows it is ours): no detour, no route change.
            LOG.info("routes: public IPv4 %s present; no detour needed", identity.public_ipv4)
            ec2 = _ec2_client(deps, config, creds)
            outcome = _claim(deps, config, deadline, ec2=ec2, me=identity.instance_id, before=lambda: None)
        else:

            def abandon_through_detour() -> None:
                nonlocal abandoned
                abandoned = True
                _complete(deps, config, identity.instance_id, "ABANDON", creds, through_detour=True)

            outcome = _detour_and_claim(
                deps,
                config,
                deadline,
                identity=identity,
                nat=nat,
                creds=creds,
                abandon=abandon_through_detour,
            )
    except ReclaimError as err:
        deps.interrupts.disarm()
        # A stop request is not this instance's failure: no ABANDON for it. Once tried through the
        # detour, ABANDON is not sent again: after the restore there is usually no route to the API.
        if not isinstance(err, Terminated) and not abandoned:
            _complete(deps, config, identity.instance_id, "ABANDON", creds)
        raise
    deps.interrupts.disarm()
    LOG.info("ec2: %s: %s", config.allocation_id, outcome.value)
    _complete(deps, config, identity.instance_id, "CONTINUE", creds)
    return EXIT_OK


def _complete(
    deps: Deps,
    config: Config,
    instance_id: str,
    result: str,
    creds: Optional[Credentials],
    *,
    through_detour: bool = False,
) -> None:
    if config.lifecycle_hook is None:
        return
    from bootstrap.claim import complete_lifecycle  # noqa: PLC0415

    # A fresh client: after the restore, the connections made through the NAT died with the detour;
    # through the detour, its connections are closed before the restore (see _close_connections).
    try:
        if creds is None:
            creds = deps.imds.credentials()
        client = _api_client(
            "lifecycle", lambda: deps.clients.autoscaling(config.autoscaling_endpoint_url, creds)
        )
    except ReclaimError as err:
        LOG.warning("lifecycle: %s not sent: %s", result, err)
        return
    if through_detour:
        LOG.info("lifecycle: sending %s through the detour, before the restore", result)
    try:
        complete_lifecycle(client, config.lifecycle_hook, instance_id, result)
    finally:
        if through_detour:
            _close_connections(client)


def _ec2_client(deps: Deps, config: Config, creds: Optional[Credentials]) -> EC2Client:
    return _api_client("ec2", lambda: deps.clients.ec2(config.ec2_endpoint_url, creds))


def _api_client(what: str, make: Callable[[], _C]) -> _C:
    """Make an API client; botocore's own errors (credentials, endpoint) are transient (75), one line."""
    from botocore.exceptions import BotoCoreError  # noqa: PLC0415 (botocore loads on a background thread)

    try:
        return make()
    except BotoCoreError as err:
        one_line = " ".join(str(err).split())
        raise TransientError(
            f"{what}: cannot make the API client: {type(err).__name__}: {one_line}"
        ) from None


def dry_run(config: Config, deps: Deps, out: TextIO) -> int:
    """Print what a run would do; change nothing (no lock, no journal, no API call)."""
    identity = deps.imds.identity()
    nat = config.nat_for(identity.subnet_id)
    lines = [
        f"instance {identity.instance_id} in {identity.subnet_id} ({identity.subnet_cidr}), "
        f"VPC {', '.join(identity.vpc_cidrs)}, public IPv4 {identity.public_ipv4 or 'none'}",
    ]
    if deps.journal.read() is not None:
        lines.append(f"would first restore the detour journaled in {deps.journal.path}")
    calls = [
        f"DescribeAddresses(AllocationIds=[{config.allocation_id}])",
        "DescribeInstances(holder, self) if another instance holds it; yield if the holder is a newer member"
        " of this instance's Auto Scaling group",
        f"AssociateAddress({config.allocation_id}, {identity.instance_id}, AllowReassociation=True)"
        " unless already held",
        "DescribeAddresses to verify",
    ]
    if identity.public_ipv4:
        lines.append(f"no detour: public IPv4 {identity.public_ipv4} reaches the API as routed now")
    else:
        with deps.netlink() as netlink:
            plan = _plan(deps, netlink, identity, nat)
        lines.append(f"would journal to {deps.journal.path}:")
        lines += [f"  default route now: {r.describe()}" for r in plan.default_routes] or [
            "  no default route"
        ]
        lines += [f"would add pin: {p.describe()}" for p in plan.pins] or ["would add no pin (all present)"]
        lines.append(f"would replace the default route by: {plan.detour.describe()}")
        lines.append(f"would check IMDS still answers as {identity.instance_id}")
    lines += [f"would call {call}" for call in calls]
    if not identity.public_ipv4:
        lines.append("would restore the default route(s) as journaled and remove only the pins added")
    if config.lifecycle_hook:
        hook = config.lifecycle_hook
        lines.append(
            f"would call CompleteLifecycleAction({hook.auto_scaling_group}, {hook.hook}, CONTINUE or ABANDON)"
        )
    out.write("".join(f"dry-run: {line}\n" for line in lines))
    return EXIT_OK


@contextmanager
def pyroute2_netlink() -> Iterator[Netlink]:
    """pyroute2's IPRoute in the current network namespace (narrow import: the package is large)."""
    from pyroute2.iproute.linux import IPRoute  # noqa: PLC0415

    with IPRoute() as ipr:
        yield routes.PyRoute2Netlink(ipr)
