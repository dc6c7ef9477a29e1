"""Every branch of one run, through `main()`, with small fakes: exit code, routes, API calls, lifecycle."""

from __future__ import annotations

import errno
import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from botocore.exceptions import (
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from bootstrap.errors import ReclaimError
from bootstrap.imds import ImdsError
from bootstrap.route_model import DetourPlan, Route
from bootstrap.state import Lock
from tests.unit.test_bootstrap_fakes import (
    AL2023_TABLE,
    EIP,
    IFINDEX,
    OTHER,
    SELF,
    FakeAutoScaling,
    FakeClock,
    FakeEc2,
    Rig,
    client_error,
    route_failure,
)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp=tmp_path)


def _default(rig: Rig) -> Route:
    return next(r for r in rig.netlink.table if r.dst == "0.0.0.0/0")


def test_success_detours_claims_restores_and_continues(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    seen_during: list[Route] = []
    rig.ec2.before_call = lambda op: seen_during.append(_default(rig))

    assert rig.main() == 0

    assert rig.netlink.table == AL2023_TABLE
    assert rig.ec2.calls == [
        "DescribeAddresses",
        "DescribeInstances",
        "AssociateAddress",
        "DescribeAddresses",
    ]
    assert rig.ec2.address["InstanceId"] == SELF
    # Every API call went out through the NAT, with the DHCP route's metric, protocol and source.
    assert {(r.gateway, r.priority, r.proto, r.prefsrc) for r in seen_during} == {
        ("10.0.0.4", 512, 16, "10.0.0.10")
    }
    assert [c["LifecycleActionResult"] for c in rig.autoscaling.completed] == ["CONTINUE"]
    assert not Path(rig.journal.path).exists()
    err = capsys.readouterr().err
    assert "fake-secret-never-logged" not in err and "fake-token-never-logged" not in err


def test_api_connections_close_while_the_detour_still_carries_them(rig: Rig) -> None:
    # Closed after the restore, a connection's FIN would leave by the router and hang in FIN-WAIT-1.
    at_close: list[Route] = []
    rig.ec2.on_close = lambda: at_close.append(_default(rig))

    assert rig.main() == 0

    assert rig.ec2.closes == 1
    assert [r.gateway for r in at_close] == ["10.0.0.4"]
    assert rig.netlink.table == AL2023_TABLE


def test_api_connections_close_before_the_restore_on_failure_too(rig: Rig) -> None:
    at_close: list[Route] = []
    rig.ec2.on_close = lambda: at_close.append(_default(rig))
    rig.ec2.errors["AssociateAddress"] = [client_error("UnauthorizedOperation", 403)]

    assert rig.main() == 3

    assert [r.gateway for r in at_close] == ["10.0.0.4"]
    assert rig.netlink.table == AL2023_TABLE


def test_pins_are_added_via_the_router_and_only_they_are_removed(rig: Rig) -> None:
    # aws-facts: facts-subnet-reserved-addresses, facts-link-local-dns, facts-link-local-time
    rig.main()
    added = [r for op, r in rig.netlink.calls if op == "add"]
    deleted = [r for op, r in rig.netlink.calls if op == "delete"]
    assert [r.dst for r in added] == [
        "169.254.169.254/32",
        "169.254.169.253/32",
        "169.254.169.123/32",
        "10.0.0.0/16",
    ]
    assert {(r.gateway, r.oif) for r in added} == {("10.0.0.1", IFINDEX)}
    assert deleted == added


def test_a_pin_that_already_exists_is_left_alone(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    theirs = Route(dst="169.254.169.254/32", gateway="10.0.0.1", oif=IFINDEX, priority=512, proto=16)
    rig.netlink.table.append(theirs)
    before = list(rig.netlink.table)
    assert rig.main() == 0
    assert rig.netlink.table == before
    assert all(r.dst != "169.254.169.254/32" for op, r in rig.netlink.calls if op in ("add", "delete"))
    assert "left alone: 169.254.169.254/32" in capsys.readouterr().err


def test_a_pin_that_appears_between_plan_and_add_is_not_removed(rig: Rig) -> None:
    theirs = Route(dst="169.254.169.253/32", gateway="10.0.0.1", oif=IFINDEX)

    def race(command: str, route: Route) -> None:
        if command == "add" and route.dst == theirs.dst and theirs not in rig.netlink.table:
            rig.netlink.table.append(theirs)

    rig.netlink.on_change = race
    assert rig.main() == 0
    assert rig.netlink.table == [*AL2023_TABLE, theirs]


def test_botocore_itself_may_never_use_imdsv1(monkeypatch: pytest.MonkeyPatch) -> None:
    from bootstrap.aws import disable_imds_v1

    monkeypatch.delenv("AWS_EC2_METADATA_V1_DISABLED", raising=False)
    disable_imds_v1()
    assert os.environ["AWS_EC2_METADATA_V1_DISABLED"] == "true"


def test_public_ipv4_means_no_detour(rig: Rig) -> None:
    rig.imds.identity_value = replace(rig.imds.identity_value, public_ipv4="203.0.113.9")
    assert rig.main() == 0
    assert rig.netlink.calls == []
    assert rig.ec2.address["InstanceId"] == SELF


def test_already_held_with_the_eip_as_public_ipv4_makes_no_write_and_no_route_change(rig: Rig) -> None:
    rig.ec2 = FakeEc2(holder=SELF)
    rig.imds.identity_value = replace(rig.imds.identity_value, public_ipv4=EIP)
    assert rig.main() == 0
    assert rig.netlink.calls == []
    assert rig.ec2.calls == ["DescribeAddresses"]


def test_already_held_without_public_ipv4_yet_makes_no_write(rig: Rig) -> None:
    rig.ec2 = FakeEc2(holder=SELF)
    assert rig.main() == 0
    assert rig.ec2.calls == ["DescribeAddresses"]
    assert rig.netlink.table == AL2023_TABLE


def test_unassociated_address_is_taken_without_describing_instances(rig: Rig) -> None:
    # aws-facts: facts-describe-addresses
    rig.ec2 = FakeEc2(holder=None)
    assert rig.main() == 0
    assert rig.ec2.calls == ["DescribeAddresses", "AssociateAddress", "DescribeAddresses"]


def _member(
    instance_id: str, launched: str, group: str = "svc-asg", state: str = "running"
) -> dict[str, object]:
    return {
        "InstanceId": instance_id,
        "LaunchTime": launched,
        "State": {"Name": state},
        "Tags": [{"Key": "aws:autoscaling:groupName", "Value": group}],
    }


def test_yields_to_a_newer_member_of_the_same_group(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    rig.ec2.instances = {
        SELF: _member(SELF, "2026-01-01T00:00:00Z"),
        OTHER: _member(OTHER, "2026-01-02T00:00:00Z"),
    }
    assert rig.main() == 0
    assert "AssociateAddress" not in rig.ec2.calls
    assert rig.ec2.address["InstanceId"] == OTHER
    assert rig.netlink.table == AL2023_TABLE
    assert f"yielding to newer instance {OTHER}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "theirs",
    [
        _member(OTHER, "2025-12-31T00:00:00Z"),  # older member
        _member(OTHER, "2026-01-02T00:00:00Z", group="another-asg"),  # newer, another group
        _member(OTHER, "2026-01-02T00:00:00Z", state="shutting-down"),  # newer but going away
        None,  # gone from the API
    ],
)
def test_takes_it_from_anyone_but_a_running_newer_member(rig: Rig, theirs: dict[str, object] | None) -> None:
    # aws-facts: facts-associate-reassociation, facts-reserved-group-tag
    rig.ec2.instances = {SELF: _member(SELF, "2026-01-01T00:00:00Z")}
    if theirs:
        rig.ec2.instances[OTHER] = theirs
    assert rig.main() == 0
    assert rig.ec2.address["InstanceId"] == SELF


@pytest.mark.parametrize("code", ["UnauthorizedOperation", "AuthFailure", "InvalidAllocationID.NotFound"])
@pytest.mark.parametrize("op", ["DescribeAddresses", "AssociateAddress"])
def test_permanent_errors_fail_fast_with_3_and_abandon(rig: Rig, code: str, op: str) -> None:
    rig.ec2.errors[op] = [client_error(code)]
    assert rig.main() == 3
    assert rig.clock.slept == []
    assert rig.netlink.table == AL2023_TABLE
    assert [c["LifecycleActionResult"] for c in rig.autoscaling.completed] == ["ABANDON"]


def test_unknown_allocation_is_3(rig: Rig) -> None:
    assert rig.main(config=rig.config(allocation_id="eipalloc-0000000000000dead")) == 3
    assert rig.netlink.table == AL2023_TABLE


@pytest.mark.parametrize(
    "error",
    [
        client_error("RequestLimitExceeded"),
        client_error("Throttling"),
        client_error("InternalError", 500),
        client_error("SomethingNew", 503),
        EndpointConnectionError(endpoint_url="https://ec2"),
        ReadTimeoutError(endpoint_url="https://ec2"),
    ],
)
def test_transient_errors_are_retried_with_backoff(rig: Rig, error: Exception) -> None:
    rig.ec2.errors["AssociateAddress"] = [error, error, error]
    assert rig.main() == 0
    assert rig.ec2.calls.count("AssociateAddress") == 4
    assert len(rig.clock.slept) == 3
    assert all(0 <= s <= 5 for s in rig.clock.slept)
    assert rig.netlink.table == AL2023_TABLE


def test_throttled_until_the_deadline_exits_75_restores_and_leaves_the_action_to_a_restart(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.ec2.errors["DescribeAddresses"] = [client_error("RequestLimitExceeded")] * 10_000
    assert rig.main(config=rig.config(deadline_seconds=30)) == 75
    assert sum(rig.clock.slept) < 30
    assert rig.netlink.table == AL2023_TABLE
    # Transient: systemd restarts the run, which may still succeed; ABANDON would forbid that.
    assert rig.autoscaling.completed == []
    assert "no ABANDON: a restarted run still fits in the hook's window" in capsys.readouterr().err


def test_other_client_errors_are_not_retried(rig: Rig) -> None:
    rig.ec2.errors["AssociateAddress"] = [client_error("InvalidParameterValue")]
    assert rig.main() == 3
    assert rig.ec2.calls.count("AssociateAddress") == 1


def test_verify_waits_for_eventual_consistency(rig: Rig) -> None:
    calls = {"n": 0}
    real = rig.ec2.describe_addresses

    def lagging(AllocationIds: list[str]) -> dict[str, object]:
        reply = real(AllocationIds=AllocationIds)
        calls["n"] += 1
        if "AssociateAddress" in rig.ec2.calls and calls["n"] < 4:
            reply["Addresses"][0]["InstanceId"] = OTHER
        return reply

    rig.ec2.describe_addresses = lagging  # type: ignore[method-assign]
    assert rig.main() == 0
    assert len(rig.clock.slept) == 2


def test_imds_unreachable_exits_75_with_no_route_change(rig: Rig) -> None:
    rig.imds.fail_identity = ImdsError("imds: instance-id: no answer after 5 attempts")
    assert rig.main() == 75
    assert rig.netlink.calls == []
    assert rig.autoscaling.completed == []


def test_identity_guard_catches_the_nats_imds(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    rig.imds.later_instance_ids = ["i-0nat0000000000000"]
    assert rig.main() == 75
    assert rig.ec2.calls == []
    assert rig.netlink.table == AL2023_TABLE
    err = capsys.readouterr().err
    assert "instance-id during the detour is i-0nat0000000000000" in err


def test_identity_guard_treats_silence_as_a_missing_pin(rig: Rig) -> None:
    rig.imds.fail_guard = ImdsError("timed out")
    assert rig.main() == 75
    assert rig.ec2.calls == []
    assert rig.netlink.table == AL2023_TABLE


def test_default_route_put_back_by_dhcp_is_replaced_before_the_next_call(rig: Rig) -> None:
    def renew(op: str) -> None:
        if op == "DescribeInstances":
            rig.netlink.replace(AL2023_TABLE[0])

    seen: list[str | None] = []
    rig.ec2.before_call = lambda op: (renew(op), seen.append(_default(rig).gateway))  # type: ignore[func-returns-value]
    assert rig.main() == 0
    # Renewed inside DescribeInstances; AssociateAddress and the verify went through the NAT again.
    assert seen == ["10.0.0.4", "10.0.0.1", "10.0.0.4", "10.0.0.4"]
    assert rig.netlink.table == AL2023_TABLE


def test_no_default_route_at_all_gets_a_temporary_one_that_is_removed(rig: Rig) -> None:
    rig.netlink.table = AL2023_TABLE[1:]
    assert rig.main() == 0
    assert rig.netlink.table == AL2023_TABLE[1:]


def test_restore_failure_keeps_the_journal_and_exits_75(rig: Rig) -> None:
    rig.ec2.errors["AssociateAddress"] = [client_error("UnauthorizedOperation")]

    def break_restore(command: str, route: Route) -> None:
        if command == "replace" and route.gateway == "10.0.0.1":
            raise route_failure(command, route, errno.ENETUNREACH)

    rig.netlink.on_change = break_restore
    assert rig.main() == 75
    assert Path(rig.journal.path).exists()
    # The next run (network back) finds the journal and restores first.
    rig.netlink.fail_on = {}
    rig.netlink.on_change = lambda c, r: None
    rig.ec2.errors = {}
    assert rig.main() == 0
    assert rig.netlink.table == AL2023_TABLE


def test_journal_from_a_killed_run_is_restored_first(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    from bootstrap import routes

    plan = routes.plan_detour(
        rig.netlink,
        mac="02:00:0a:00:00:0a",
        subnet_cidr="10.0.0.0/24",
        vpc_cidrs=["10.0.0.0/16"],
        nat="10.0.0.4",
    )
    rig.journal.write({"plan": plan.to_json()})
    routes.apply_pins(rig.netlink, plan)
    rig.netlink.replace(plan.detour)  # ... and then SIGKILL
    rig.ec2 = FakeEc2(holder=SELF)
    assert rig.main() == 0
    assert rig.netlink.table == AL2023_TABLE
    assert "recover:" in capsys.readouterr().err


def test_journal_written_before_the_first_change(rig: Rig) -> None:
    snapshots: list[dict[str, object] | None] = []
    rig.netlink.on_change = lambda command, route: snapshots.append(rig.journal.read())
    rig.main()
    first = snapshots[0]
    assert first is not None
    plan = DetourPlan.from_json(first["plan"])  # type: ignore[arg-type]
    assert plan.default_routes == (AL2023_TABLE[0],)
    assert len(plan.pins) == 4


def test_sigterm_during_the_api_call_restores_and_exits_75(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.ec2.before_call = lambda op: (
        os.kill(os.getpid(), signal.SIGTERM) if op == "AssociateAddress" else None
    )
    assert rig.main() == 75
    assert rig.netlink.table == AL2023_TABLE
    assert rig.ec2.address["InstanceId"] == OTHER
    assert "SIGTERM" in capsys.readouterr().err
    # A stop request is not a failure of this instance: no ABANDON.
    assert rig.autoscaling.completed == []


def test_signal_handlers_and_the_alarm_are_put_back_after_a_run(rig: Rig) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM)}
    assert rig.main() == 0
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_second_signal_during_restore_does_not_cut_it_short(rig: Rig) -> None:
    rig.ec2.before_call = lambda op: (
        os.kill(os.getpid(), signal.SIGTERM) if op == "AssociateAddress" else None
    )
    rig.netlink.on_change = lambda command, route: (
        os.kill(os.getpid(), signal.SIGTERM) if command == "delete" else None
    )
    assert rig.main() == 75
    assert rig.netlink.table == AL2023_TABLE


def test_a_signal_during_a_route_change_waits_for_the_change_to_finish(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    # Raised inside pyroute2's asyncio transport, an exception would kill the netlink socket that the
    # restore needs: the signal is held until the next blocking wait (here: the first API call).
    def signal_while_pinning(command: str, route: Route) -> None:
        if command == "add" and route.dst == "169.254.169.253/32":
            os.kill(os.getpid(), signal.SIGTERM)

    rig.netlink.on_change = signal_while_pinning
    assert rig.main() == 75
    assert [r.dst for op, r in rig.netlink.calls if op == "add"] == [
        "169.254.169.254/32",
        "169.254.169.253/32",
        "169.254.169.123/32",
        "10.0.0.0/16",
    ]
    assert rig.ec2.calls == []
    assert rig.netlink.table == AL2023_TABLE
    assert "SIGTERM" in capsys.readouterr().err


def test_a_signal_after_the_restore_began_is_only_logged(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.netlink.on_change = lambda command, route: (
        os.kill(os.getpid(), signal.SIGTERM) if command == "delete" else None
    )
    assert rig.main() == 0
    assert rig.netlink.table == AL2023_TABLE
    assert "already finishing" in capsys.readouterr().err


def test_no_lifecycle_hook_means_no_lifecycle_call(rig: Rig) -> None:
    assert rig.main(config=rig.config(lifecycle_hook=None)) == 0
    assert rig.autoscaling.completed == []


def test_continue_that_never_gets_through_is_retried_until_the_deadline_then_75(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.autoscaling = FakeAutoScaling(error=EndpointConnectionError(endpoint_url="https://autoscaling"))
    calls: list[str] = []
    rig.autoscaling.before_call = calls.append
    assert rig.main(config=rig.config(deadline_seconds=60)) == 75
    assert rig.ec2.address["InstanceId"] == SELF
    assert rig.netlink.table == AL2023_TABLE
    # Three quick tries through the detour, then over the Elastic IP until the deadline.
    assert len(calls) > 3 and set(calls) == {"CONTINUE"}
    err = capsys.readouterr().err
    assert "report: CONTINUE through the detour: not sent after 3 attempt(s)" in err
    assert "the address is held, but CONTINUE or the stack's signal could not be sent" in err


def test_no_pending_lifecycle_action_is_not_a_warning(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    # aws-facts: facts-no-active-lifecycle-action
    rig.ec2 = FakeEc2(holder=SELF)
    rig.autoscaling = FakeAutoScaling(error=client_error("ValidationError", 400, "CompleteLifecycleAction"))
    rig.autoscaling.error.response["Error"]["Message"] = (  # type: ignore[union-attr]
        "No active Lifecycle Action found with instance ID i-0123456789abcdef0"
    )
    assert rig.main() == 0
    err = capsys.readouterr().err
    assert "no pending launch action" in err
    assert "WARNING" not in err


def test_continue_goes_through_the_detour_before_the_restore(rig: Rig) -> None:
    clients = rig.deps().clients
    order: list[str] = []
    rig.netlink.on_change = lambda command, route: order.append(command)
    from bootstrap.cli import main

    deps = rig.deps()
    deps.clients = clients
    real = clients.autoscaling

    def tracking(*args: object) -> object:
        order.append("autoscaling-client")
        return real(*args)  # type: ignore[arg-type]

    clients.autoscaling = tracking  # type: ignore[method-assign]
    assert main(["--config", rig.config()], deps=deps) == 0
    assert order.index("autoscaling-client") < min(i for i, c in enumerate(order) if c == "delete")


def test_lock_held_by_another_run_exits_75(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    holder = Lock(str(rig.tmp / "state"), FakeClock())
    holder.acquire()
    try:
        assert rig.main() == 75
    finally:
        holder.release()
    assert rig.netlink.calls == []
    assert "another eip-reclaim run holds" in capsys.readouterr().err


def test_dry_run_changes_nothing_and_prints_the_plan(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    assert rig.main("--dry-run") == 0
    assert rig.netlink.calls == []
    assert rig.ec2.calls == []
    assert not (rig.tmp / "state").exists()
    out = capsys.readouterr().out
    assert "would add pin: 169.254.169.254/32 via 10.0.0.1" in out
    detour = "0.0.0.0/0 via 10.0.0.4 dev index 7 proto dhcp src 10.0.0.10 metric 512"
    assert f"would replace the default route by: {detour}" in out
    assert "AssociateAddress" in out


def test_subnet_not_in_the_map_exits_2_and_touches_no_route(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rig.main(config=rig.config(nat_by_subnet={"subnet-0bbb": "10.0.1.4"})) == 2
    assert rig.netlink.calls == []
    assert rig.ec2.calls == []
    lines = capsys.readouterr().err.strip().splitlines()
    assert "nat_by_subnet" in lines[-1] and "subnet-0aaa" in lines[-1]


def test_nat_outside_the_subnet_exits_2_and_touches_no_route(rig: Rig) -> None:
    assert rig.main(config=rig.config(nat_by_subnet={"subnet-0aaa": "10.0.9.4"})) == 2
    assert rig.netlink.calls == []


def test_a_default_route_that_could_not_be_restored_exactly_is_never_touched(rig: Rig) -> None:
    rig.netlink.table[0] = replace(AL2023_TABLE[0], gateway=None, unsupported=("RTA_MULTIPATH",))
    before = list(rig.netlink.table)
    assert rig.main() == 75
    assert rig.netlink.calls == []
    assert rig.netlink.table == before


def test_journaled_routes_round_trip_through_json(rig: Rig) -> None:
    from bootstrap import routes

    plan = routes.plan_detour(
        rig.netlink,
        mac="02:00:0a:00:00:0a",
        subnet_cidr="10.0.0.0/24",
        vpc_cidrs=["10.0.0.0/16"],
        nat="10.0.0.4",
    )
    assert DetourPlan.from_json(json.loads(json.dumps(plan.to_json()))) == replace(plan, kept=())


def test_interface_not_found_by_mac_exits_75_without_change(rig: Rig) -> None:
    rig.netlink.links = {}
    assert rig.main() == 75
    assert rig.netlink.calls == []


def test_skip_pins_env_is_test_only_and_warned(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.skip_pins = frozenset({"imds"})
    monkeypatch.setenv("EIP_RECLAIM_TEST_SKIP_PINS", "imds")
    assert rig.main(config=rig.config(test=True)) == 0
    assert all(r.dst != "169.254.169.254/32" for _, r in rig.netlink.calls)
    assert "TEST ONLY" in capsys.readouterr().err


def test_skip_pins_env_is_ignored_outside_a_test_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Through the real command line (no injected deps): the switch must never reach production.
    from bootstrap.cli import main

    monkeypatch.setenv("EIP_RECLAIM_TEST_SKIP_PINS", "imds")
    rig = Rig(tmp_path)
    assert main(["--config", rig.config(), "--dry-run"], deps=rig.deps()) == 0
    err = capsys.readouterr().err
    assert "EIP_RECLAIM_TEST_SKIP_PINS ignored: test switches apply only to a test configuration" in err


def test_unknown_skip_pin_name_is_a_configuration_error(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EIP_RECLAIM_TEST_SKIP_PINS", "imds,dsn")
    assert rig.main(config=rig.config(test=True)) == 2
    assert rig.netlink.calls == []


def test_help_needs_no_config(capsys: pytest.CaptureFixture[str]) -> None:
    from bootstrap.cli import main

    assert main(["--help"]) == 0
    assert "--dry-run" in capsys.readouterr().out


def test_usage_error_is_2() -> None:
    from bootstrap.cli import main

    assert main([]) == 2


def test_log_lines_carry_elapsed_milliseconds(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    rig.main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("+") and " ms " in line for line in lines)
    assert any(line.split(" ms ", 1)[1].startswith("imds: instance " + SELF) for line in lines)


def test_every_exit_code_is_a_domain_exception() -> None:
    from bootstrap import errors

    codes = {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, ReclaimError)
    }
    assert codes == {2, 3, 75}


def test_journal_document_is_plain_json(rig: Rig) -> None:
    captured: list[str] = []
    rig.netlink.on_change = lambda command, route: captured.append(Path(rig.journal.path).read_text())
    rig.main()
    document = json.loads(captured[0])
    assert document["version"] == 1
    assert document["plan"]["nat"] == "10.0.0.4"


@pytest.mark.parametrize(
    "plan",
    [
        {"nat": "10.0.0.4"},  # keys missing
        {"ifindex": "seven", "router": "r", "nat": "n", "default_routes": [], "detour": {}, "pins": []},
        {
            "ifindex": 7,
            "router": "r",
            "nat": "n",
            "default_routes": [{"colour": 1}],
            "detour": {},
            "pins": [],
        },
    ],
)
def test_a_malformed_journal_exits_75_naming_it_and_keeps_it(
    rig: Rig, capsys: pytest.CaptureFixture[str], plan: dict[str, object]
) -> None:
    rig.journal.write({"plan": plan})
    assert rig.main() == 75
    assert rig.netlink.calls == []
    assert Path(rig.journal.path).exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rig.journal.path in last and "inspect and remove it" in last and "(exit 75)" in last


THIRD = "i-03333333333333333"


def _taken_after_associate(rig: Rig, by: str, times: int) -> None:
    """Another instance's AssociateAddress lands right after each of ours (the first `times` of them)."""
    left = [times]

    def steal(op: str) -> None:
        if op == "DescribeAddresses" and rig.ec2.calls[-2:-1] == ["AssociateAddress"] and left[0] > 0:
            left[0] -= 1
            rig.ec2.address["InstanceId"] = by

    rig.ec2.before_call = steal


def test_verify_sees_a_newer_member_take_it_and_yields(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    rig.ec2.instances = {
        SELF: _member(SELF, "2026-01-02T00:00:00Z"),
        OTHER: _member(OTHER, "2026-01-01T00:00:00Z"),
        THIRD: _member(THIRD, "2026-01-03T00:00:00Z"),
    }
    _taken_after_associate(rig, THIRD, times=1)
    assert rig.main() == 0
    assert rig.ec2.calls == [
        "DescribeAddresses",
        "DescribeInstances",
        "AssociateAddress",
        "DescribeAddresses",
        "DescribeInstances",
    ]
    assert rig.ec2.address["InstanceId"] == THIRD
    assert rig.clock.slept == []  # no spinning until the deadline
    assert rig.netlink.table == AL2023_TABLE
    assert [c["LifecycleActionResult"] for c in rig.autoscaling.completed] == ["CONTINUE"]
    err = capsys.readouterr().err
    assert f"is now held by {THIRD}, not this instance; deciding again" in err
    assert f"yielding to newer instance {THIRD}" in err


@pytest.mark.parametrize(
    "third",
    [_member(THIRD, "2025-12-31T00:00:00Z"), _member(THIRD, "2026-01-03T00:00:00Z", group="other"), None],
    ids=["older-member", "newer-other-group", "unknown"],
)
def test_verify_sees_another_instance_take_it_and_associates_again(
    rig: Rig, capsys: pytest.CaptureFixture[str], third: dict[str, object] | None
) -> None:
    rig.ec2.instances = {SELF: _member(SELF, "2026-01-02T00:00:00Z")}
    if third:
        rig.ec2.instances[THIRD] = third
    _taken_after_associate(rig, THIRD, times=1)
    assert rig.main() == 0
    assert rig.ec2.calls == [
        "DescribeAddresses",
        "DescribeInstances",
        "AssociateAddress",
        "DescribeAddresses",
        "DescribeInstances",
        "AssociateAddress",
        "DescribeAddresses",
    ]
    assert rig.ec2.address["InstanceId"] == SELF
    assert rig.netlink.table == AL2023_TABLE
    assert "associating again (1 of at most 3)" in capsys.readouterr().err


def test_verify_gives_up_after_three_reassociations_with_75(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    _taken_after_associate(rig, THIRD, times=10_000)
    assert rig.main() == 75
    assert rig.ec2.calls.count("AssociateAddress") == 1 + 3
    assert rig.ec2.address["InstanceId"] == THIRD
    assert rig.netlink.table == AL2023_TABLE
    assert rig.autoscaling.completed == []  # transient, and a restart fits: no ABANDON
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"taken by {THIRD} after this instance associated it 4 times" in last and "(exit 75)" in last


def test_verify_reads_the_replaced_holder_as_lag_only_a_few_times(rig: Rig) -> None:
    # The holder it replaced took it back: after a few reads that is a taking, not eventual consistency.
    _taken_after_associate(rig, OTHER, times=1)
    assert rig.main() == 0
    assert rig.ec2.calls.count("AssociateAddress") == 2
    assert rig.ec2.address["InstanceId"] == SELF
    assert sum(rig.clock.slept) < 30


def test_abandon_after_a_permanent_failure_goes_through_the_detour_once(rig: Rig) -> None:
    # Without a public IPv4 the instance has no route to the API once the detour is gone.
    at_call: list[str | None] = []
    at_close: list[str | None] = []
    rig.autoscaling.before_call = lambda result: at_call.append(_default(rig).gateway)
    rig.autoscaling.on_close = lambda: at_close.append(_default(rig).gateway)
    rig.ec2.errors["AssociateAddress"] = [client_error("UnauthorizedOperation", 403)]

    assert rig.main() == 3

    assert [c["LifecycleActionResult"] for c in rig.autoscaling.completed] == ["ABANDON"]
    assert at_call == ["10.0.0.4"]
    assert at_close == ["10.0.0.4"]  # its connections closed before the restore, like the EC2 client's
    assert rig.netlink.table == AL2023_TABLE


def test_abandon_that_fails_through_the_detour_is_not_sent_again(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    at_call: list[str | None] = []
    rig.autoscaling = FakeAutoScaling(error=EndpointConnectionError(endpoint_url="https://autoscaling"))
    rig.autoscaling.before_call = lambda result: at_call.append(_default(rig).gateway)
    rig.ec2.errors["DescribeAddresses"] = [client_error("AuthFailure", 401)]

    assert rig.main() == 3

    assert at_call == ["10.0.0.4"]
    assert rig.netlink.table == AL2023_TABLE
    assert "report: ABANDON through the detour: not sent after 1 attempt(s)" in capsys.readouterr().err


def test_abandon_after_the_deadline_in_the_detour_goes_through_the_detour(rig: Rig) -> None:
    at_call: list[str | None] = []
    rig.autoscaling.before_call = lambda result: at_call.append(_default(rig).gateway)
    rig.ec2.errors["DescribeAddresses"] = [client_error("RequestLimitExceeded")] * 10_000
    # 600 s after boot, a 660 s hook: a restarted run would not fit in the window, so this one abandons.
    assert (
        rig.main(
            config=rig.config(
                deadline_seconds=30,
                lifecycle_hook={
                    "auto_scaling_group": "svc-asg",
                    "hook": "svc-launch",
                    "timeout_seconds": 660,
                },
            )
        )
        == 75
    )
    assert at_call == ["10.0.0.4"]
    assert [c["LifecycleActionResult"] for c in rig.autoscaling.completed] == ["ABANDON"]


def test_abandon_after_the_identity_guard_tripped_stays_best_effort_after_the_restore(rig: Rig) -> None:
    # The guard says IMDS (and so perhaps the route) is not ours: nothing is sent through that detour.
    at_call: list[str | None] = []
    rig.autoscaling.before_call = lambda result: at_call.append(_default(rig).gateway)
    rig.imds.later_instance_ids = ["i-0nat0000000000000"]
    assert (
        rig.main(
            config=rig.config(
                lifecycle_hook={"auto_scaling_group": "svc-asg", "hook": "svc-launch", "timeout_seconds": 660}
            )
        )
        == 75
    )
    assert at_call == ["10.0.0.1"]
    assert [c["LifecycleActionResult"] for c in rig.autoscaling.completed] == ["ABANDON"]


def test_continue_is_sent_through_the_detour_and_its_connection_closed_before_the_restore(rig: Rig) -> None:
    at_call: list[str | None] = []
    rig.autoscaling.before_call = lambda result: at_call.append(_default(rig).gateway)
    rig.autoscaling.on_close = lambda: at_call.append(_default(rig).gateway)
    assert rig.main() == 0
    assert at_call == ["10.0.0.4", "10.0.0.4"]


@pytest.mark.parametrize(
    "error",
    [
        PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
        ParamValidationError(report="odd"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_botocore_errors_of_a_call_are_transient_75_in_one_line(
    rig: Rig, capsys: pytest.CaptureFixture[str], error: Exception
) -> None:
    rig.ec2.errors["AssociateAddress"] = [error]
    assert rig.main() == 75
    assert rig.ec2.calls.count("AssociateAddress") == 1
    assert rig.netlink.table == AL2023_TABLE
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("(exit 75)")
    assert f"ERROR: ec2: AssociateAddress: {type(error).__name__}: " in last


def test_botocore_error_making_the_client_is_transient_75(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    from bootstrap.cli import main

    deps = rig.deps()

    def no_credentials(endpoint_url: object, credentials: object, **_: object) -> object:
        raise PartialCredentialsError(provider="explicit", cred_var="aws_secret_access_key")

    deps.clients.ec2 = no_credentials  # type: ignore[method-assign]
    assert main(["--config", rig.config()], deps=deps) == 75
    assert rig.netlink.table == AL2023_TABLE
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ec2: cannot make the API client: PartialCredentialsError" in last and "(exit 75)" in last


def test_botocore_error_of_the_lifecycle_call_is_logged_not_fatal(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.autoscaling = FakeAutoScaling(error=NoCredentialsError())
    assert rig.main(config=rig.config(deadline_seconds=20)) == 75
    assert rig.ec2.address["InstanceId"] == SELF
    assert (
        "report: CONTINUE through the detour: NoCredentialsError: Unable to locate credentials; retry 1"
        in (capsys.readouterr().err)
    )


def test_an_odd_imds_credentials_document_is_75(rig: Rig) -> None:
    rig.imds.fail_credentials = ImdsError("imds: iam/security-credentials/r: field AccessKeyId is missing")
    assert rig.main() == 75
    assert rig.netlink.calls == []
