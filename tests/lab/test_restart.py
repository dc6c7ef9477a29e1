"""A run that fails transiently and is restarted, as systemd restarts the boot unit, inside a launch
hook window long enough for the restart: the failed run sends no ABANDON (nor a FAILURE signal), and the
restarted run takes the address and completes the launch action.

The lab compresses time as it compresses the deadline (vpc.LAB_DEADLINE_SECONDS for 240 s): the unit's
RestartSec (30 s in deploy/systemd/eip-reclaim.service) is LAB_RESTART_SECONDS here, and the
instance's uptime is what the run is told (EIP_RECLAIM_TEST_UPTIME), so the hook's window is sized from
it, not from the host's.
"""

from __future__ import annotations

import time

import pytest

from bootstrap import reclaim
from bootstrap.cli import UPTIME_ENV
from tests.lab import vpc

pytestmark = pytest.mark.root

# The unit's RestartSec, compressed for the lab.
LAB_RESTART_SECONDS = 1.0
# The first run starts this long after boot.
FIRST_UPTIME = 60.0
# Room for exactly one more attempt after the first fails at its deadline, by the payload's own rule
# (launch to boot, the first run, the unit's restart delay, a whole second run, the reports), and not
# for a third.
HOOK_SECONDS = int(
    reclaim.LAUNCH_TO_BOOT_SECONDS
    + FIRST_UPTIME
    + vpc.LAB_DEADLINE_SECONDS
    + reclaim.RESTART_DELAY_SECONDS
    + vpc.LAB_DEADLINE_SECONDS
    + reclaim.REPORT_SECONDS
    + 10
)


def test_a_restarted_run_that_still_fits_the_hook_window_is_waited_for(lab: vpc.Lab) -> None:
    instance = lab.boot(0, hook_timeout_seconds=HOOK_SECONDS)
    # Every EC2 call throttled: the first run ends at its deadline with exit 75 (transient).
    lab.set_api_faults(throttle_first=100_000)
    before = instance.routes()
    first = instance.run_payload(env={UPTIME_ENV: str(FIRST_UPTIME)})
    assert first.returncode == 75, first.stderr
    assert instance.routes() == before, first.stderr
    assert "lifecycle: no ABANDON: a restarted run still fits in the hook's window" in first.stderr
    assert [c for c in lab.lifecycle_calls() if c.get("InstanceId") == instance.instance_id] == []
    assert [c for c in lab.signal_calls() if c.get("UniqueId") == instance.instance_id] == []

    # systemd restarts the unit after RestartSec; the API answers again.
    lab.set_api_faults()
    time.sleep(LAB_RESTART_SECONDS)
    second_uptime = FIRST_UPTIME + first.seconds + LAB_RESTART_SECONDS
    second = instance.run_payload(env={UPTIME_ENV: str(second_uptime)})
    assert second.returncode == 0, second.stderr
    assert instance.routes() == before, second.stderr
    assert lab.holder() == instance.instance_id
    assert lab.client_get() == instance.instance_id
    # Inside the window, counted from launch.
    assert reclaim.LAUNCH_TO_BOOT_SECONDS + second_uptime + second.seconds <= HOOK_SECONDS
    results = [
        c["LifecycleActionResult"]
        for c in lab.lifecycle_calls()
        if c.get("InstanceId") == instance.instance_id
    ]
    assert results == ["CONTINUE"], second.stderr
    signals = [c["Status"] for c in lab.signal_calls() if c.get("UniqueId") == instance.instance_id]
    assert signals == ["SUCCESS"], second.stderr
