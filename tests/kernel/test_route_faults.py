"""Route-level faults of the payload (issue 8) against the real kernel: every table exactly as it was."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.kernel import test_payload_kernel as payload_tests
from tests.kernel import world as lab
from tests.kernel.world import World

pytestmark = pytest.mark.root

# The same fixtures as the payload's own kernel tests: this checkout, or the shipped bundle under Python 3.9.
bundle = payload_tests.bundle
w = payload_tests.w
both_payloads = payload_tests.both_payloads


def _congestion(table: list[dict[str, Any]]) -> list[Any]:
    return [r.get("metrics") for r in table if r["dst"] == "default"]


@both_payloads
def test_a_congestion_control_metric_comes_back_exactly(w: World) -> None:
    """RTAX_CC_ALGO is a name, not a number: journaled, detoured and restored as it was."""
    w.inst.ip("route", "replace", *f"{lab.AL2023_ROUTES[-1]} mtu 1400 congctl cubic".split())
    before = w.all_routes()
    assert _congestion(before) == [[{"mtu": 1400, "congestion": "cubic"}]], "congctl refused here"
    code, _, err = w.run_payload(w.config())
    assert code == 0, err
    assert w.all_routes() == before
    assert not w.journal.exists()
    assert w.holder() == w.ids["self"]


def test_a_pin_flushed_during_the_detour_is_put_back_and_removed_by_the_restore(w: World) -> None:
    """A lease renewal may flush routes: the next call's re-assertion adds the pin back."""
    before = w.all_routes()
    time_pin = f"169.254.169.123 via {lab.ROUTER} dev {lab.IFNAME}"
    w.pause_api()
    proc = w.start_payload(w.config())
    try:
        w.wait_for_detour()
        # Past the identity guard and the first call's re-assertion: that call waits on the paused API.
        time.sleep(1.0)
        w.inst.ip("route", "del", *time_pin.split())
        w.inst.ip("route", "del", lab.VPC_CIDR)
        assert not [r for r in w.routes() if r["dst"] in ("169.254.169.123", lab.VPC_CIDR)]
    finally:
        w.resume_api()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "pin 169.254.169.123/32 via 10.0.0.1" in err and "added back" in err
    assert f"pin {lab.VPC_CIDR} via" in err
    assert w.all_routes() == before
    assert not w.journal.exists()


@payload_tests.both_payloads
def test_a_leftover_detour_without_a_journal_is_put_back_via_the_router(w: World) -> None:
    """The journal is gone (removed, or /run lost) but the detour stayed: it is not the original."""
    before = w.all_routes()
    leftover = lab.AL2023_ROUTES[-1].replace(f"via {lab.ROUTER}", f"via {lab.NAT}")
    w.inst.ip("route", "replace", *leftover.split())
    assert [r["gateway"] for r in w.defaults()] == [lab.NAT]
    code, _, err = w.run_payload(w.config())
    assert code == 0, err
    assert w.all_routes() == before
    assert err.count("no journal accounts for") == 1, err
    assert w.holder() == w.ids["self"]
