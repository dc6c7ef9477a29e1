"""Take the Elastic IP: describe, decide, associate, verify; retry what is transient, fail fast otherwise."""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from bootstrap.clock import Deadline
from bootstrap.errors import Contested, DeadlineExceeded, PermanentError, TransientError
from bootstrap.interrupts import interruptible

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

LOG = logging.getLogger(__name__)

T = TypeVar("T")

# Early in the first boot these may pass on their own: the role, its instance profile and its policy
# are created in the same deployment and take seconds to propagate, and the clock may not be synced
# yet (RequestExpired). Retried while the host is younger than AUTH_GRACE_AFTER_BOOT_SECONDS, then
# permanent. botocore's NoCredentialsError (IMDS not serving the role's credentials yet) likewise.
AUTH_CODES = frozenset(
    {"UnauthorizedOperation", "AuthFailure", "RequestExpired", "InvalidClientTokenId", "AccessDenied"}
)
# IAM's propagation is documented as "eventually consistent", typically seconds; three minutes covers
# the slow cases seen in the field and is still well inside the launch hook's window.
AUTH_GRACE_AFTER_BOOT_SECONDS = 180.0
# Retrying cannot fix these: the role lacks a permission, the credentials are refused, or the
# allocation does not exist in this account and region.
PERMANENT_CODES = AUTH_CODES | frozenset(
    {
        "InvalidAllocationID.NotFound",
        "InvalidAllocationID.Malformed",
        "OptInRequired",
        "Blocked",
        "SignatureDoesNotMatch",
    }
)
# Throttling and server-side trouble; InvalidInstanceID.NotFound too, because EC2 is eventually
# consistent and a just-launched instance can be unknown to the API for a few seconds.
TRANSIENT_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "InvalidInstanceID.NotFound",
    }
)
# Full-jitter exponential backoff (AWS Architecture Blog, "Exponential Backoff and Jitter"): 0.2 s
# doubles up to 5 s, so a throttled burst of instances spreads out without waiting long.
BACKOFF_BASE_SECONDS = 0.2
BACKOFF_CAP_SECONDS = 5.0
ASG_TAG = "aws:autoscaling:groupName"
# EC2 tags an instance launched from a launch template with the template's id and version (reserved: no
# one can set them by hand). Version numbers count per template: they compare only within one id.
TEMPLATE_ID_TAG = "aws:ec2launchtemplate:id"
TEMPLATE_VERSION_TAG = "aws:ec2launchtemplate:version"
# Another instance may associate the address right after this one (two members claiming at once): the
# verify then sees it and decides again (yield or associate again), at most this many times per run.
MAX_REASSOCIATIONS = 3
# Right after AssociateAddress, DescribeAddresses may still show the holder it replaced (or none): read
# as eventual consistency for this long (reads with backoff), then as the address having been taken back.
# EC2's read-after-write lag is usually under a second and rarely several.
VERIFY_LAG_SECONDS = 15.0
GONE_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})


class NotYet(Exception):
    """A check that may pass when repeated (the API is eventually consistent)."""


class Outcome(enum.Enum):
    ALREADY_HELD = "already held by this instance"
    ASSOCIATED = "associated with this instance"
    YIELDED = "left with a newer member of the group"


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", "Unknown"))


def _is_transient(err: Exception) -> bool:
    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return _error_code(err) in TRANSIENT_CODES or (
            _error_code(err) not in PERMANENT_CODES and int(status or 0) >= 500
        )
    return isinstance(err, (BotoConnectionError, HTTPClientError))


class Retrier:
    """Runs one API call until it succeeds, fails permanently, or the deadline passes."""

    def __init__(
        self,
        deadline: Deadline,
        before_attempt: Callable[[], None] = lambda: None,
        rng: Optional[random.Random] = None,
        uptime: Callable[[], float] = lambda: AUTH_GRACE_AFTER_BOOT_SECONDS,
    ) -> None:
        self.deadline = deadline
        self.before_attempt = before_attempt
        self.rng = rng or random.Random()
        self.uptime = uptime
        self.attempts = 0

    def _in_auth_grace(self) -> bool:
        return self.uptime() < AUTH_GRACE_AFTER_BOOT_SECONDS

    def call(self, what: str, func: Callable[[], T]) -> T:
        attempt = 0
        while True:
            self.deadline.check(what)
            self.before_attempt()
            self.attempts += 1
            try:
                with interruptible():
                    return func()
            except NotYet as err:
                reason = str(err)
            except (ClientError, BotoConnectionError, HTTPClientError) as err:
                code = _error_code(err) if isinstance(err, ClientError) else type(err).__name__
                if code in AUTH_CODES and self._in_auth_grace():
                    reason = f"{code} (IAM or the clock may still be settling after boot)"
                elif not _is_transient(err):
                    raise PermanentError(f"ec2: {what}: {code}: {err}") from None
                else:
                    reason = code
            except NoCredentialsError as err:
                if not self._in_auth_grace():
                    raise PermanentError(
                        f"ec2: {what}: {type(err).__name__}: no role credentials "
                        f"{AUTH_GRACE_AFTER_BOOT_SECONDS:g} s after boot (is an instance profile attached?)"
                    ) from None
                reason = f"{type(err).__name__} (the role's credentials may not be served yet)"
            except BotoCoreError as err:
                # PartialCredentialsError, ...: not a refusal by the API (so not 3), and nothing that
                # retrying within this run fixes; the next run (systemd) may.
                one_line = " ".join(str(err).split())
                raise TransientError(f"ec2: {what}: {type(err).__name__}: {one_line}") from None
            attempt += 1
            delay = self.rng.uniform(0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt))
            LOG.warning("ec2: %s: %s; retry %d in %d ms", what, reason, attempt, delay * 1000)
            try:
                self.deadline.sleep(delay, f"retrying {what}")
            except DeadlineExceeded as err:
                raise DeadlineExceeded(
                    f"ec2: {what}: still {reason} after {attempt} attempts: {err}"
                ) from None


def _describe_address(ec2: EC2Client, allocation_id: str) -> dict[str, Any]:
    addresses = ec2.describe_addresses(AllocationIds=[allocation_id])["Addresses"]
    if not addresses:
        raise PermanentError(f"ec2: DescribeAddresses: {allocation_id} not found")
    return dict(addresses[0])


def _newer_member(ec2: EC2Client, retrier: Retrier, me: str, holder: str) -> Optional[str]:
    """The holder's group name if it is a running, newer member of this instance's group; else None."""
    reply = retrier.call(
        "DescribeInstances",
        lambda: ec2.describe_instances(Filters=[{"Name": "instance-id", "Values": [me, holder]}]),
    )
    found = {i["InstanceId"]: i for r in reply["Reservations"] for i in r.get("Instances", [])}
    mine, theirs = found.get(me), found.get(holder)
    if mine is None or theirs is None:
        return None
    if theirs.get("State", {}).get("Name") in GONE_STATES:
        return None

    def group(instance: Any) -> Optional[str]:
        return next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == ASG_TAG), None)

    if group(mine) is None or group(mine) != group(theirs):
        return None
    if _seniority(theirs, mine) > _seniority(mine, theirs):
        return group(mine)
    return None


def _seniority(instance: Any, other: Any) -> tuple[int, Any, str]:
    """Which of two members of a group keeps the address: the one whose tuple against the other is larger.

    1. The launch template version (EC2's reserved `aws:ec2launchtemplate:version` tag), only when both
       were launched from the same template (equal `aws:ec2launchtemplate:id`): a member of a newer
       version of the group's template always wins against an older one. With a warm pool, a rolling
       update replaces the members in service but not the pool's stopped instances, so a pool instance
       still on the old template may be started while the new member serves; it must not take the
       address from it. Version numbers count per template: across two templates (the group's template
       replaced by another) they say nothing about which is newer, and are not compared.
    2. `LaunchTime`, which EC2 resets at every start: among members of one version (or of two templates),
       the one started last is the one Auto Scaling just put in service (a replacement, or a pool
       instance leaving the pool), so it wins against the member it replaces while that one still runs.
    3. The instance id: two members started in the same second decide the same way on both.
    """
    tags, others = _tags(instance), _tags(other)
    template = tags.get(TEMPLATE_ID_TAG)
    version = tags.get(TEMPLATE_VERSION_TAG, "")
    same_template = template is not None and template == others.get(TEMPLATE_ID_TAG)
    number = int(version) if same_template and version.isdigit() else 0
    return (number, instance["LaunchTime"], instance["InstanceId"])


def _tags(instance: Any) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def claim(ec2: EC2Client, instance_id: str, allocation_id: str, retrier: Retrier) -> Outcome:
    """Make `instance_id` hold `allocation_id` unless it already does or a newer member holds it."""
    address = retrier.call("DescribeAddresses", lambda: _describe_address(ec2, allocation_id))
    public_ip = address.get("PublicIp", "?")
    holder: Optional[str] = address.get("InstanceId")
    if holder == instance_id:
        LOG.info("ec2: %s (%s) is already held by this instance; no change", allocation_id, public_ip)
        return Outcome.ALREADY_HELD
    reassociations = 0
    while True:
        if holder:
            group = _newer_member(ec2, retrier, instance_id, holder)
            if group is not None:
                LOG.info(
                    "ec2: yielding to newer instance %s of group %s, which holds %s (%s); no change",
                    holder,
                    group,
                    allocation_id,
                    public_ip,
                )
                return Outcome.YIELDED
        if reassociations:
            LOG.warning(
                "ec2: %s (%s) is held by %s; associating again (%d of at most %d)",
                allocation_id,
                public_ip,
                holder or "no instance",
                reassociations,
                MAX_REASSOCIATIONS,
            )
        else:
            LOG.info(
                "ec2: %s (%s) is held by %s; associating", allocation_id, public_ip, holder or "no instance"
            )
        retrier.call(
            "AssociateAddress",
            lambda: ec2.associate_address(
                AllocationId=allocation_id, InstanceId=instance_id, AllowReassociation=True
            ),
        )
        now = _verify(ec2, instance_id, allocation_id, retrier, replaced=holder)
        if now == instance_id:
            LOG.info("ec2: verified: %s (%s) is held by %s", allocation_id, public_ip, instance_id)
            return Outcome.ASSOCIATED
        if reassociations >= MAX_REASSOCIATIONS:
            raise Contested(
                f"ec2: {allocation_id} ({public_ip}) taken by {now or 'no instance'} after this instance "
                f"associated it {reassociations + 1} times; giving up for this run"
            )
        LOG.warning(
            "ec2: verify: %s (%s) is now held by %s, not this instance; deciding again",
            allocation_id,
            public_ip,
            now or "no instance",
        )
        holder = now
        reassociations += 1


def _verify(
    ec2: EC2Client, instance_id: str, allocation_id: str, retrier: Retrier, *, replaced: Optional[str]
) -> Optional[str]:
    """The holder after our AssociateAddress: this instance, or the one that took it since.

    The holder it replaced (or none) is read as eventual consistency for a few reads; any other
    instance has associated the address after us, and the caller decides again at once.
    """
    lag_ends = retrier.deadline.clock.monotonic() + VERIFY_LAG_SECONDS

    def read() -> Optional[str]:
        now: Optional[str] = _describe_address(ec2, allocation_id).get("InstanceId")
        lagging = retrier.deadline.clock.monotonic() < lag_ends
        if now != instance_id and now == replaced and lagging:
            raise NotYet(f"held by {now or 'no instance'}")
        return now

    return retrier.call("verify DescribeAddresses", read)
