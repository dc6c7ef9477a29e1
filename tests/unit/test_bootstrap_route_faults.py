"""Route-level faults of one run (issue 8), through `main()` with the kernel-like fakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootstrap.routes import Route
from tests.unit.test_bootstrap_fakes import AL2023_TABLE, Rig, client_error


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp=tmp_path)


def test_a_pin_flushed_mid_detour_is_back_before_the_next_call(rig: Rig) -> None:
    imds_pin = "169.254.169.254/32"

    def pinned() -> bool:
        return any(r.dst == imds_pin for r in rig.netlink.table)

    def flush(op: str) -> None:
        seen.append(pinned())
        if len(seen) == 1:
            gone: Route = next(r for r in rig.netlink.table if r.dst == imds_pin)
            rig.netlink.delete(gone)

    seen: list[bool] = []
    rig.ec2.before_call = flush
    rig.ec2.errors["DescribeAddresses"] = [client_error("RequestLimitExceeded")]
    assert rig.main() == 0
    # Flushed during the first (throttled) call; every later call had the pin again.
    assert seen[0] and all(seen[1:]) and len(seen) > 2
    assert rig.netlink.table == AL2023_TABLE
