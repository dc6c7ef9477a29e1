"""Every target lifecycle state AWS documents for IMDS, and the payload's answer to each, in the lab.

IMDS `autoscaling/target-lifecycle-state` names the steady state Auto Scaling is taking the instance to:
`InService` (claim the address), the four `Warmed:*` of a warm pool (complete the launch action, claim
nothing), and `Terminated`, `Standby`, `Detached` (touch nothing). The lab's IMDS serves only these
values. aws-facts: stand-in-imds-target-states
"""

from __future__ import annotations

import pytest

from tests.lab import imds, vpc

pytestmark = pytest.mark.root

NAT_UPLINK = vpc.nat_uplink_ip(0)


def test_the_lab_serves_only_documented_target_states() -> None:
    assert set(imds.TARGET_LIFECYCLE_STATES) == {
        "InService",
        "Terminated",
        "Detached",
        "Standby",
        "Warmed:Hibernated",
        "Warmed:Running",
        "Warmed:Stopped",
        "Warmed:Terminated",
    }
    with pytest.raises(ValueError, match="not one AWS documents"):
        imds.target_lifecycle_state("Warmed:Pending:Wait")


@pytest.mark.parametrize("state", imds.TARGET_LIFECYCLE_STATES)
def test_the_payload_answers_each_documented_target_state(lab: vpc.Lab, state: str) -> None:
    instance = lab.boot(0)
    lab.set_target_lifecycle_state(instance, state)
    before = instance.routes()
    run = instance.run_payload()
    assert run.returncode == 0, run.stderr
    assert instance.routes() == before, run.stderr
    associations = [
        c
        for c in lab.ec2_calls()
        if c["access_key"] == instance.access_key_id and c["action"] == "AssociateAddress"
    ]
    results = [
        (c["LifecycleActionResult"], c["src"], c["status"])
        for c in lab.lifecycle_calls()
        if c.get("InstanceId") == instance.instance_id
    ]
    signals = [c["Status"] for c in lab.signal_calls() if c.get("UniqueId") == instance.instance_id]
    if state == "InService":
        # Claims: the address, the launch action completed, the deployment told.
        assert lab.holder() == instance.instance_id, run.stderr
        assert len(associations) == 1
        assert [r[0] for r in results] == ["CONTINUE"]
        assert signals == ["SUCCESS"]
    elif state.startswith("Warmed:"):
        # Prepared for the pool: the launch action completed through the detour, nothing claimed.
        assert lab.holder() is None, run.stderr
        assert associations == []
        assert results == [("CONTINUE", NAT_UPLINK, 200)], run.stderr
        assert signals == []
    else:
        # Leaving service or the group: no claim, no lifecycle call, no signal.
        assert lab.holder() is None, run.stderr
        assert associations == []
        assert results == []
        assert signals == []
