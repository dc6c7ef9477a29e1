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
from bootstrap.errors import (
    EXIT_OK,
    EXIT_TEMPFAIL,
    IdentityMismatch,
    ReclaimError,
    Terminated,
    TransientError,
)
from bootstrap.imds import Credentials, Identity, Imds, ImdsError
from bootstrap.interrupts import INTERRUPTS, Interrupts
from bootstrap.report import Reporter
from bootstrap.routes import DetourPlan, Netlink
from bootstrap.state import Journal, Marks, remove_stray_temporaries

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_cloudformation import CloudFormationClient
    from mypy_boto3_cloudwatch import CloudWatchClient
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

    def cloudformation(
        self, endpoint_url: Optional[str], credentials: Optional[Credentials]
    ) -> CloudFormationClient: ...

    def cloudwatch(
        self, endpoint_url: Optional[str], credentials: Optional[Credentials]
    ) -> CloudWatchClient: ...


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
    try:
        journal.delete()
    except OSError as err:
        # The routes are as journaled: a journal left behind only makes the next run's recovery a no-op.
        LOG.warning(
            "journal: cannot remove %s: %s; the next run finds the routes already restored", journal.path, err
        )


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


# systemd's RestartSec= in eip-reclaim.service: the pause before the next attempt after exit 75.
RESTART_DELAY_SECONDS = 30.0
# The hook's window opens at launch; the kernel boots some seconds later, so uptime undercounts by this.
LAUNCH_TO_BOOT_SECONDS = 30.0
# A run that has claimed the address still needs this long to restore and complete the action.
REPORT_SECONDS = 15.0
# Role credentials not served yet early in the first boot: asked again with this pause (see claim).
CREDENTIALS_BACKOFF_SECONDS = 1.0


def another_attempt_fits(config: Config, uptime: float) -> bool:
    """Whether a restarted run could still complete the launch action before the hook's timeout.

    The next attempt starts RESTART_DELAY_SECONDS after this one and may use its whole deadline; the hook's
    window opened about LAUNCH_TO_BOOT_SECONDS before the boot. With the stacks' values (a 660 s hook, a
    240 s deadline) a first run that fails at 270 s after boot leaves room for one more
    (30 + 270 + 30 + 240 + 15 = 585 s), and that one, failing at about 540 s, does not (855 s): it abandons.
    """
    hook = config.lifecycle_hook
    if hook is None or hook.timeout_seconds is None:
        return True  # unknown window: the hook's own default result decides
    next_ends = LAUNCH_TO_BOOT_SECONDS + uptime + RESTART_DELAY_SECONDS + config.deadline_seconds
    return next_ends + REPORT_SECONDS <= hook.timeout_seconds


class _Run:
    """One run's state once IMDS has named the instance: what it claimed, and whom it told."""

    def __init__(self, config: Config, deps: Deps, deadline: Deadline, identity: Identity) -> None:
        self.config = config
        self.deps = deps
        self.deadline = deadline
        self.identity = identity
        self.creds: Optional[Credentials] = None
        self.verified = False  # the claim ended with the address held by this instance or a newer member
        self.failure_reported = False
        self.reporter = Reporter(
            config=config,
            clients=deps.clients,
            marks=Marks(deps.journal.directory),
            instance_id=identity.instance_id,
            credentials=self.credentials,
            deadline=deadline,
            rng=deps.rng,
        )

    def credentials(self) -> Optional[Credentials]:
        """The role's credentials from IMDS, asked again while the first boot is young (see claim)."""
        if self.creds is not None:
            return self.creds
        from bootstrap.claim import AUTH_GRACE_AFTER_BOOT_SECONDS  # noqa: PLC0415

        while True:
            young = self.deps.clock.uptime() < AUTH_GRACE_AFTER_BOOT_SECONDS
            try:
                creds = self.deps.imds.credentials()
            except ImdsError as err:
                if not young:
                    raise
                reason = str(err)
            else:
                if creds is not None or not young:
                    self.creds = creds
                    return creds
                reason = "no role listed yet"
            LOG.warning("imds: role credentials not served yet (%s); asking again", reason)
            self.deadline.sleep(CREDENTIALS_BACKOFF_SECONDS, "waiting for the role's credentials")

    def claim(self, before: Callable[[], None]) -> Outcome:
        from bootstrap.claim import Retrier, claim  # noqa: PLC0415 (botocore loads on a background thread)

        ec2 = _api_client("ec2", lambda: self.deps.clients.ec2(self.config.ec2_endpoint_url, self.creds))
        try:
            retrier = Retrier(self.deadline, before, self.deps.rng, uptime=self.deps.clock.uptime)
            outcome = claim(ec2, self.identity.instance_id, self.config.allocation_id, retrier)
        finally:
            _close_connections(ec2)
        self.verified = True
        return outcome

    def fail(self, err: ReclaimError, *, where: str) -> None:
        """ABANDON (and the FAILURE signal) only when the outcome is final; see docs/payload.md."""
        if self.failure_reported or self.verified or isinstance(err, Terminated):
            return
        if not self.reporter.lifecycle_pending() and self.config.signal is None:
            return
        if err.exit_code == EXIT_TEMPFAIL:
            uptime = self.deps.clock.uptime()
            if another_attempt_fits(self.config, uptime):
                LOG.info(
                    "lifecycle: no ABANDON: a restarted run still fits in the hook's window (%.0f s up)",
                    uptime,
                )
                return
            LOG.warning("lifecycle: no time left in the hook's window for another attempt; abandoning")
        self.failure_reported = True
        self.reporter.failed(where=where)


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


def _detour_and_claim(run: _Run, nat: str) -> tuple[Outcome, bool]:
    """Detour, claim and report through the detour, restore; (outcome, everything reported)."""
    deps, identity = run.deps, run.identity
    api = _api_address(run.config)
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
                outcome = run.claim(before_attempt)
            except ReclaimError as err:
                # Through the detour, before the restore: without a public IPv4 the instance has no
                # route to the API afterwards, and the group would wait out the hook's timeout.
                run.fail(err, where="through the detour")
                raise
            LOG.info("ec2: %s: %s", run.config.allocation_id, outcome.value)
            # Through the detour too, before the restore: the Elastic IP's path can take a moment.
            reported = run.reporter.succeeded(until_deadline=False, where="through the detour")
        finally:
            restore_and_forget(netlink, plan, deps.journal, deps.interrupts)
            LOG.info("routes: restored as journaled; journal removed")
    return outcome, reported


def _api_address(config: Config) -> str:
    """The EC2 endpoint's IPv4 address, resolved before the detour, for the path check.

    Through the process's bounded resolver (cli installs it): a hung lookup neither holds a stop nor
    outlasts its timeout.
    """
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
    for name in remove_stray_temporaries(deps.journal.directory):
        LOG.info("state: removed %s, left by an interrupted write", name)
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
    state = _Run(config, deps, deadline, identity)
    try:
        nat = config.nat_for(identity.subnet_id)
        creds = state.credentials()
        LOG.info(
            "imds: %s", "role credentials read" if creds else "no instance role; default credential chain"
        )
        if identity.public_ipv4:
            # A public address means the API is reachable as things are (and if it is the Elastic IP,
            # DescribeAddresses shows it is ours): no detour, no route change.
            LOG.info("routes: public IPv4 %s present; no detour needed", identity.public_ipv4)
            outcome = state.claim(lambda: None)
            LOG.info("ec2: %s: %s", config.allocation_id, outcome.value)
            reported = False
        else:
            outcome, reported = _detour_and_claim(state, nat)
    except ReclaimError as err:
        deps.interrupts.disarm()
        state.fail(err, where="directly" if identity.public_ipv4 else "after the restore")
        raise
    from bootstrap.claim import Outcome  # noqa: PLC0415 (botocore is loaded by now)

    heal_seconds = deadline.elapsed()
    deps.interrupts.disarm()
    if not reported:
        # Over the Elastic IP (or the public address), until the deadline: a launch action left pending
        # times out to ABANDON, and the group would terminate the instance that holds the address.
        reported = state.reporter.succeeded(until_deadline=True, where="over the Elastic IP")
    if outcome is Outcome.ASSOCIATED:
        state.reporter.metrics(
            {"Healed": (1.0, "Count"), "HealSeconds": (heal_seconds, "Seconds")}, where="over the Elastic IP"
        )
    if not reported:
        raise TransientError(
            "lifecycle: the address is held, but CONTINUE or the stack's signal could not be sent; "
            "a restarted run sends it"
        )
    return EXIT_OK


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
