"""Promises the payload makes that no scenario would notice breaking: the API clients' timeouts, and the
ABANDON rule's constants against the systemd unit values they stand for."""

from __future__ import annotations

from typing import Any

import pytest

from bootstrap import aws, reclaim
from bootstrap.config import Config, LifecycleHook
from bootstrap.imds import Credentials
from stacks.healing_service import BOOT_ALLOWANCE_SECONDS, HOOK_HEARTBEAT
from stacks.payload_config import DEADLINE_SECONDS
from tests.unit.test_systemd_units import BOOT, UNITS_DIR, one, parse_unit, seconds

# botocore's own defaults, which a client built without our Config would fall back to.
BOTOCORE_DEFAULT_TIMEOUT = 60
CREDENTIALS = Credentials("AKIAEXAMPLE", "example-secret", "example-token")


@pytest.fixture(scope="module")
def factory() -> aws.ClientFactory:
    return aws.ClientFactory("ap-southeast-2").start()


@pytest.mark.parametrize(
    ("service", "connect", "read"),
    [
        # The claim: a few hundred milliseconds away through the NAT; a stuck call must leave the
        # deadline's retry loop room for several more tries.
        ("ec2", 3, 10),
        # The reports: a few quick tries through the detour before the restore.
        ("autoscaling", 2, 5),
        ("cloudformation", 2, 5),
        ("cloudwatch", 2, 5),
    ],
)
def test_every_api_client_has_short_timeouts(
    factory: aws.ClientFactory, service: str, connect: int, read: int
) -> None:
    """The values are written here, not imported: a client left at botocore's 60 s, or a constant
    raised, fails this test."""
    client: Any = getattr(factory, service)("http://127.0.0.1:9", CREDENTIALS)
    config = client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (connect, read)
    assert max(config.connect_timeout, config.read_timeout) < BOTOCORE_DEFAULT_TIMEOUT
    # One attempt per call: the payload's loop retries, with the deadline and the detour in view.
    assert config.retries["total_max_attempts"] == 1


@pytest.fixture(scope="module")
def boot_unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNITS_DIR / BOOT)


def test_the_abandon_rules_restart_delay_is_the_units_restart_sec(boot_unit: dict) -> None:
    """The rule counts on the next attempt starting RestartSec after a failure."""
    assert seconds(one(boot_unit, "Service", "RestartSec")) == reclaim.RESTART_DELAY_SECONDS


def test_the_abandon_rules_launch_to_boot_fits_the_stacks_boot_allowance() -> None:
    """The hook's window opens at launch: the rule's launch-to-boot guess is inside the allowance the
    stacks give the boot and the install before the first run."""
    assert 0 < reclaim.LAUNCH_TO_BOOT_SECONDS <= BOOT_ALLOWANCE_SECONDS


def test_every_attempt_the_abandon_rule_waits_for_is_one_systemd_still_starts(boot_unit: dict) -> None:
    """A transient failure (exit 75) ends a run at its deadline. With the unit's RestartSec and start
    limit and the stacks' hook window, the attempts the rule does not abandon for all fit inside
    StartLimitBurst within StartLimitIntervalSec: systemd never refuses a restart the rule waits for."""
    restart = seconds(one(boot_unit, "Service", "RestartSec"))
    burst = int(one(boot_unit, "Unit", "StartLimitBurst"))
    window = seconds(one(boot_unit, "Unit", "StartLimitIntervalSec"))
    hook = int(HOOK_HEARTBEAT.to_seconds())
    config = Config(
        version=1,
        region="ap-southeast-2",
        allocation_id="eipalloc-0123456789abcdef0",
        deadline_seconds=DEADLINE_SECONDS,
        lifecycle_hook=LifecycleHook("svc-asg", "svc-launch", timeout_seconds=hook),
    )
    starts = [0.0]
    while reclaim.another_attempt_fits(config, starts[-1] + DEADLINE_SECONDS):
        starts.append(starts[-1] + DEADLINE_SECONDS + restart)
    # The stacks' window earns exactly one retry (healing_service.py sizes it so).
    assert len(starts) == 2
    assert len(starts) <= burst
    assert starts[-1] - starts[0] < window
