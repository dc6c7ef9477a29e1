"""Launch-first handovers as a client sees them: a client polls the Elastic IP every 50 ms while
(a) a deploy's new instance takes over beside the old one, (b) the watchdog's report replaces an
instance launch-first, (c) a Spot rebalance replaces an instance that then gets its interruption notice.

In each, the address moves once (old → new, never back), the old instance's re-checks yield, and the
gap the client sees is printed (`pytest -s`); `python -m benchmarks.heal` reports (a) as handover_gap_s.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.lab import handover, vpc
from tests.lab.test_failover import associations_by, run_watchdog, with_health_check

pytestmark = pytest.mark.root

# The lab's re-check timer is run by hand: twice during each overlap (a systemd timer may fire any time).
RECHECKS = 2
# Long enough for the client to poll several times after each step.
SETTLE_SECONDS = 0.3


def heal(lab: vpc.Lab, instance: vpc.Instance) -> None:
    run = instance.run_payload()
    assert run.returncode == 0, run.stderr
    assert "associated" in run.stderr or "verified" in run.stderr, run.stderr
    handover.wait_for_answer(lab, instance, run.started)


def recheck_yields(lab: vpc.Lab, old: vpc.Instance, new: vpc.Instance) -> None:
    """The old instance's re-check timer fires while the new one holds the address: it must yield."""
    for _ in range(RECHECKS):
        run = old.run_payload()
        assert run.returncode == 0, run.stderr
        assert "yielding to newer instance" in run.stderr, run.stderr
        assert lab.holder() == new.instance_id, run.stderr


def assert_moved_once(lab: vpc.Lab, old: vpc.Instance, new: vpc.Instance, what: str) -> handover.ClientView:
    view = handover.client_view(lab, old, new)
    print(
        f"\nhandover {what}: client gap {view.gap_seconds:.3f} s (last old to first new answer "
        f"{view.switch_seconds:.3f} s), {view.unanswered} of {view.polls} "
        f"polls unanswered in between, answered by {' -> '.join(i[-6:] for i in view.answered_by)}"
    )
    # Old, then new, never back: the address moved once and did not flap.
    assert view.answered_by == [old.instance_id, new.instance_id], view
    assert len(associations_by(lab, old)) == 1  # its own first heal only
    assert len(associations_by(lab, new)) == 1
    assert lab.holder() == new.instance_id
    return view


def nothing_abandoned(lab: vpc.Lab, instance: vpc.Instance) -> None:
    results = [
        c["LifecycleActionResult"]
        for c in lab.lifecycle_calls()
        if c.get("InstanceId") == instance.instance_id
    ]
    assert "ABANDON" not in results, results
    signals = [c["Status"] for c in lab.signal_calls() if c.get("UniqueId") == instance.instance_id]
    assert "FAILURE" not in signals, signals


def test_a_launch_first_deploy_moves_the_address_once(lab: vpc.Lab) -> None:
    """aws-facts: group-rolling-min-in-service

    CloudFormation launches the new launch template version beside the old instance, which serves
    until the new one takes the address; the old one's re-checks yield; CloudFormation then terminates it.
    """
    old = lab.boot(0)
    handover.tag_launch(lab, old, 1)
    client = handover.start_client(lab)
    try:
        heal(lab, old)
        new = lab.boot(1, launched_after=time.time())
        handover.tag_launch(lab, new, 2)
        heal(lab, new)
        recheck_yields(lab, old, new)
        time.sleep(SETTLE_SECONDS)
        lab.kill(old)  # the new one's SUCCESS: CloudFormation terminates the old one
        time.sleep(SETTLE_SECONDS)
    finally:
        handover.stop_client(client)
    assert_moved_once(lab, old, new, "(a) launch-first deploy")
    nothing_abandoned(lab, old)


def test_b_a_watchdog_report_replaces_the_instance_launch_first(lab: vpc.Lab) -> None:
    """aws-facts: group-maintenance-launch-first

    The service's health endpoint (an admin port here) dies while its main port still answers: the
    watchdog reports the instance unhealthy, Auto Scaling launches the replacement first, the
    replacement takes the address, and only then is the unhealthy one terminated.
    """
    old = lab.boot(0)
    with_health_check(old, {"port": 8080, "failures": 3, "grace_seconds": 0})
    client = handover.start_client(lab)
    try:
        heal(lab, old)
        for _ in range(3):
            tick = run_watchdog(old)
            assert tick.returncode == 0, tick.stderr
        (call,) = lab.health_calls()
        assert (call["InstanceId"], call["HealthStatus"]) == (old.instance_id, "Unhealthy"), tick.stderr
        new = lab.boot(1, launched_after=time.time())
        heal(lab, new)
        recheck_yields(lab, old, new)
        time.sleep(SETTLE_SECONDS)
        lab.kill(old)  # the replacement is in service: Auto Scaling terminates the unhealthy one
        time.sleep(SETTLE_SECONDS)
    finally:
        handover.stop_client(client)
    assert_moved_once(lab, old, new, "(b) watchdog-driven launch-first replacement")
    nothing_abandoned(lab, old)


def test_c_a_spot_rebalance_hands_over_before_the_interruption(lab: vpc.Lab) -> None:
    """aws-facts: group-capacity-rebalance, group-spot-notice

    A rebalance recommendation: Auto Scaling launches the replacement, which takes the address; then
    the old instance gets its two-minute interruption notice. Its re-check still yields (the notice
    never makes it take the address back) and it abandons nothing; then EC2 stops it.
    """
    old = lab.boot(0)
    client = handover.start_client(lab)
    try:
        heal(lab, old)
        new = lab.boot(1, launched_after=time.time())
        heal(lab, new)
        notice = handover.send_interruption_notice(lab, old)
        assert json.loads(handover.read_imds(old, "spot/instance-action")) == notice
        recheck_yields(lab, old, new)
        time.sleep(SETTLE_SECONDS)
        handover.stop(lab, old)
        time.sleep(SETTLE_SECONDS)
    finally:
        handover.stop_client(client)
    assert_moved_once(lab, old, new, "(c) Spot rebalance, then the interruption")
    nothing_abandoned(lab, old)
