"""Take the Elastic IP: describe, decide, associate, verify; retry what is transient, fail fast otherwise."""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from bootstrap.clock import Deadline
from bootstrap.config import LifecycleHook
from bootstrap.errors import Contested, DeadlineExceeded, PermanentError, TransientError
from bootstrap.interrupts import interruptible

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_ec2 import EC2Client

LOG = logging.getLogger(__name__)

T = TypeVar("T")

# Retrying cannot fix these: the role lacks a permission, the credentials are refused, or the
# allocation does not exist in this account and region.
PERMANENT_CODES = frozenset(
    {
        "UnauthorizedOperation",
        "AuthFailure",
        "InvalidAllocationID.NotFound",
        "InvalidAllocationID.Malformed",
        "OptInRequired",
        "Blocked",
        "AccessDenied",
        "InvalidClientTokenId",
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
# Another instance may associate the address right after this one (two members claiming at once): the
# verify then sees it and decides again (yield or associate again), at most this many times per run.
MAX_REASSOCIATIONS = 3
# Right after AssociateAddress, DescribeAddresses may still show the holder it replaced (or none): read
# as eventual consistency this many times, then as the address having been taken back.
VERIFY_LAG_READS = 5
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
    ) -> None:
        self.deadline = deadline
        self.before_attempt = before_attempt
        self.rng = rng or random.Random()
        self.attempts = 0

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
                if not _is_transient(err):
                    code = _error_code(err) if isinstance(err, ClientError) else type(err).__name__
                    raise PermanentError(f"ec2: {what}: {code}: {err}") from None
                reason = _error_code(err) if isinstance(err, ClientError) else f"{type(err).__name__}"
            except BotoCoreError as err:
                # NoCredentialsError, PartialCredentialsError, ...: not a refusal by the API (so not 3),
                # and nothing that retrying within this run fixes; the next run (systemd) may.
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
    if theirs["LaunchTime"] > mine["LaunchTime"]:
        return group(mine)
    return None


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
    reads = 0

    def read() -> Optional[str]:
        nonlocal reads
        reads += 1
        now: Optional[str] = _describe_address(ec2, allocation_id).get("InstanceId")
        if now != instance_id and now == replaced and reads < VERIFY_LAG_READS:
            raise NotYet(f"held by {now or 'no instance'}")
        return now

    return retrier.call("verify DescribeAddresses", read)


def complete_lifecycle(
    autoscaling: AutoScalingClient, hook: LifecycleHook, instance_id: str, result: str
) -> bool:
    """Complete the launch lifecycle action once; failures are logged, never raised (best effort)."""
    try:
        autoscaling.complete_lifecycle_action(
            LifecycleHookName=hook.hook,
            AutoScalingGroupName=hook.auto_scaling_group,
            LifecycleActionResult=result,
            InstanceId=instance_id,
        )
    except ClientError as err:
        message = str(err.response.get("Error", {}).get("Message", ""))
        if _error_code(err) == "ValidationError" and "No active Lifecycle Action" in message:
            # Every run but the first boot's (reboots, the re-check timer): nothing is waiting.
            LOG.info("lifecycle: no pending launch action for this instance; nothing to complete")
        else:
            LOG.warning(
                "lifecycle: %s for %s/%s not completed: %s", result, hook.auto_scaling_group, hook.hook, err
            )
        return False
    except (BotoCoreError, TransientError) as err:
        LOG.warning(
            "lifecycle: %s for %s/%s not completed: %s", result, hook.auto_scaling_group, hook.hook, err
        )
        return False
    LOG.info("lifecycle: %s sent for %s/%s", result, hook.auto_scaling_group, hook.hook)
    return True
