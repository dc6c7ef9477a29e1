"""One run: recover, read IMDS, open the egress, claim the Elastic IP, report, undo the egress."""

from __future__ import annotations

import logging
import random
import socket
import urllib.parse
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, TextIO, TypeVar

from bootstrap import egress, routes
from bootstrap.clients import Clients
from bootstrap.clock import Clock, Deadline
from bootstrap.config import Config
from bootstrap.egress.direct import Direct
from bootstrap.errors import EXIT_OK, EXIT_TEMPFAIL, ReclaimError, Terminated, TransientError
from bootstrap.imds import Credentials, Identity, Imds, ImdsError
from bootstrap.interrupts import INTERRUPTS, Interrupts
from bootstrap.netlink import Netlink, PyRoute2Netlink
from bootstrap.report import LIFECYCLE_MARK, SIGNAL_MARK, Reporter
from bootstrap.state import JOURNAL_NAME, Journal, Marks, remove_stray_temporaries

if TYPE_CHECKING:
    from bootstrap.claim import Outcome

LOG = logging.getLogger(__name__)

_C = TypeVar("_C")
_T = TypeVar("_T")
# Written once this instance holds the address; the watchdog waits for it.
CLAIMED_MARK = "claimed"
# IMDS autoscaling/target-lifecycle-state values for which this instance must not take the address.
NOT_IN_SERVICE = ("Terminated", "Standby", "Detached")


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
        # Seconds from the run's start to the verify (DescribeAddresses naming the holder): HealSeconds.
        self.verified_after = 0.0
        self.through_nat = False  # the API is reached through the NAT (no public IPv4, a NAT egress)
        self.failure_reported = False
        # Prepared for the warm pool (target lifecycle state Warmed:*): never signals the stack.
        self.warming = False
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

    def claim(self, way: egress.Egress) -> Outcome:
        from bootstrap.claim import Retrier, claim  # noqa: PLC0415 (botocore loads on a background thread)

        # Reports made while the egress is in place take the same way out.
        self.reporter.adopt = way.adopt
        ec2 = _api_client(
            "ec2",
            lambda: self.deps.clients.ec2(
                self.config.ec2_endpoint_url, self.creds, dualstack=self.config.dualstack
            ),
        )
        try:
            way.adopt(ec2)
            retrier = Retrier(self.deadline, way.before_call, self.deps.rng, uptime=self.deps.clock.uptime)
            outcome = claim(ec2, self.identity.instance_id, self.config.allocation_id, retrier)
            self.verified_after = self.deadline.elapsed()
        finally:
            _close_connections(ec2)
        self.verified = True
        return outcome

    def fail(self, err: ReclaimError, *, where: str) -> None:
        """ABANDON (and the FAILURE signal) only when the outcome is final; see docs/payload.md."""
        if self.failure_reported or self.verified or isinstance(err, Terminated):
            return
        signal = self.config.signal is not None and not self.warming
        if not self.reporter.lifecycle_pending() and not signal:
            return
        if self.config.dualstack and not self.identity.public_ipv4:
            # IPv6 is the only way out until the address is held, and Auto Scaling and CloudFormation
            # have no dual-stack endpoint: the hook's and the creation policy's timeouts decide.
            LOG.warning(
                "lifecycle: no ABANDON or FAILURE signal: over IPv6 alone Auto Scaling and CloudFormation "
                "cannot be reached (no dual-stack endpoint); their timeouts decide"
            )
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
        self.reporter.failed(where=where, signal=signal)


def _through(run: _Run, nat: str, work: Callable[[egress.Egress], _T]) -> _T:
    """Open the egress via the NAT, do `work` through it, undo it on every way out."""
    deps, config = run.deps, run.config
    api = _api_address(config)
    with deps.netlink() as netlink:
        context = egress.Context(
            netlink=netlink,
            journal=deps.journal,
            imds=deps.imds,
            identity=run.identity,
            nat=nat,
            api=api,
            skip_pins=deps.skip_pins,
        )
        # Reads the host and decides; a refusal here (no interface, a route it could not put back) has
        # changed nothing.
        way = egress.open_egress(config.egress, context)
        try:
            # Inside the try: an interrupt right after the journal write still undoes (a no-op then).
            way.prepare()
            run.reporter.adopt = way.adopt
            return work(way)
        finally:
            run.reporter.adopt = _nothing
            deps.interrupts.disarm()
            way.undo()


def _claim_and_report(run: _Run, way: egress.Egress) -> tuple[Outcome, bool]:
    """Claim, then CONTINUE and the SUCCESS signal through the egress in place; (outcome, all reported)."""
    try:
        outcome = run.claim(way)
    except ReclaimError as err:
        # Through the egress, before the undo: without a public IPv4 the instance has no way to the API
        # afterwards, and the group would wait out the hook's timeout.
        run.fail(err, where="through the detour")
        raise
    LOG.info("ec2: %s: %s", run.config.allocation_id, outcome.value)
    # Through the egress too, before the undo: the Elastic IP's path can take a moment.
    return outcome, run.reporter.succeeded(until_deadline=False, where="through the detour")


def _warm_up(run: _Run, way: egress.Egress) -> bool:
    """An instance being prepared for the warm pool: complete its launch action, and nothing else."""
    return run.reporter.warmed(where="through the detour" if run.through_nat else "directly")


def _api_address(config: Config) -> str:
    """The EC2 endpoint's IPv4 address, resolved before any change, for the path check.

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


def _nothing(client: object) -> None:
    """An egress that needs nothing of a client."""


def _close_connections(client: object) -> None:
    """Close the API connections made through the NAT while the detour still carries them.

    Closed after the restore, a connection's FIN would leave by the VPC router from another source
    address, go unanswered, and hold the socket in FIN-WAIT-1 for minutes.
    """
    close = getattr(client, "close", None)  # botocore clients have it; the typing stubs omit it
    if callable(close):
        close()


def run(config: Config, deps: Deps, deadline: Deadline) -> int:
    """The whole run after the lock is held. Raises ReclaimError (with its exit code) on failure."""
    _skip_warning(deps.skip_pins)
    own = (JOURNAL_NAME, *(Marks.file_name(m) for m in (CLAIMED_MARK, LIFECYCLE_MARK, SIGNAL_MARK)))
    for name in remove_stray_temporaries(deps.journal.directory, own):
        LOG.info("state: removed %s, left by an interrupted write", name)
    if deps.journal.exists():
        egress.check_journal(deps.journal)
        with deps.netlink() as netlink:
            egress.recover(netlink, deps.journal)
    if config.nat_by_subnet:
        # No NAT addresses (egress direct): nothing could be a leftover detour, and netlink stays closed.
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
    target = deps.imds.target_lifecycle_state()
    if target in NOT_IN_SERVICE:
        LOG.info("autoscaling: target lifecycle state %s: not taking the address; no change", target)
        return EXIT_OK
    state = _Run(config, deps, deadline, identity)
    warming = state.warming = target is not None and target.startswith("Warmed:")
    try:
        nat = config.nat_for(identity.subnet_id) if config.egress in egress.VIA_NAT else None
        state.through_nat = nat is not None and not identity.public_ipv4
        creds = state.credentials()
        LOG.info(
            "imds: %s", "role credentials read" if creds else "no instance role; default credential chain"
        )
        if warming:
            # Prepared for the warm pool (its first boot, then stopped): the address and the routes are
            # left alone; only the launch action waits. Put in service later, it boots again and claims.
            LOG.info("autoscaling: target lifecycle state %s: warming up for the pool; no claim", target)
            if nat is not None and state.through_nat:
                done = _through(state, nat, lambda way: _warm_up(state, way))
            else:
                done = _warm_up(state, Direct())
            if not done:
                raise TransientError(
                    "lifecycle: CONTINUE for the warm pool could not be sent; a restarted run sends it"
                )
            return EXIT_OK
        if not state.through_nat:
            # A public address means the API is reachable as things are (and if it is the Elastic IP,
            # DescribeAddresses shows it is ours); egress direct reaches it by IPv6 or an endpoint.
            if identity.public_ipv4:
                LOG.info("routes: public IPv4 %s present; no detour needed", identity.public_ipv4)
            else:
                LOG.info(
                    "routes: egress direct%s; no route change", " (dual-stack)" if config.dualstack else ""
                )
            outcome = state.claim(Direct(dualstack=config.dualstack))
            LOG.info("ec2: %s: %s", config.allocation_id, outcome.value)
            reported = False
        else:
            assert nat is not None
            outcome, reported = _through(state, nat, lambda way: _claim_and_report(state, way))
    except ReclaimError as err:
        deps.interrupts.disarm()
        state.fail(err, where="after the restore" if state.through_nat else "directly")
        raise
    from bootstrap.claim import Outcome  # noqa: PLC0415 (botocore is loaded by now)

    deps.interrupts.disarm()
    marks = state.reporter.marks
    if outcome is not Outcome.YIELDED and not marks.done(CLAIMED_MARK, identity.instance_id):
        # The watchdog (bootstrap/watchdog.py) probes the service only once this instance holds the address,
        # and counts its grace from the mark's modification time: written once (the re-check timer's runs
        # find it already there), or the grace would start again every five minutes.
        marks.mark(CLAIMED_MARK, identity.instance_id)
    if not reported:
        # Over the Elastic IP (or the public address), until the deadline: a launch action left pending
        # times out to ABANDON, and the group would terminate the instance that holds the address.
        reported = state.reporter.succeeded(until_deadline=True, where="over the Elastic IP")
    if outcome is Outcome.ASSOCIATED:
        state.reporter.metrics(
            {"Healed": (1.0, "Count"), "HealSeconds": (state.verified_after, "Seconds")},
            where="over the Elastic IP",
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
    nat = config.nat_for(identity.subnet_id) if config.egress in egress.VIA_NAT else None
    lines = [
        f"instance {identity.instance_id} in {identity.subnet_id} ({identity.subnet_cidr}), "
        f"VPC {', '.join(identity.vpc_cidrs)}, public IPv4 {identity.public_ipv4 or 'none'}",
    ]
    if deps.journal.read() is not None:
        lines.append(f"would first undo the changes journaled in {deps.journal.path}")
    calls = [
        f"DescribeAddresses(AllocationIds=[{config.allocation_id}])",
        "DescribeInstances(holder, self) if another instance holds it; yield if the holder is a newer member"
        " of this instance's Auto Scaling group",
        f"AssociateAddress({config.allocation_id}, {identity.instance_id}, AllowReassociation=True)"
        " unless already held",
        "DescribeAddresses to verify",
    ]
    if identity.public_ipv4 or nat is None:
        lines.append(f"no detour: public IPv4 {identity.public_ipv4} reaches the API as routed now")
        if not identity.public_ipv4:
            lines[-1] = f"egress {config.egress}: " + Direct(dualstack=config.dualstack).plan_lines()[0]
    else:
        with deps.netlink() as netlink:
            context = egress.Context(
                netlink=netlink,
                journal=deps.journal,
                imds=deps.imds,
                identity=identity,
                nat=nat,
                api=_api_address(config),
                skip_pins=deps.skip_pins,
            )
            lines.append(f"egress {config.egress}:")
            lines += egress.open_egress(config.egress, context).plan_lines()
    lines += [f"would call {call}" for call in calls]
    if not identity.public_ipv4 and nat is not None:
        lines.append("would undo every change as journaled, on every way the run ends")
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
    from bootstrap.iproute import iproute_class  # noqa: PLC0415

    with iproute_class()() as ipr:
        yield PyRoute2Netlink(ipr)
