"""The payload under faults (stops inside library calls, lifecycle and ABANDON rules, first-boot IAM, the
verify window, equal launch times, the state directory) and its reports to CloudFormation and CloudWatch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError

from bootstrap import interrupts, resolve, state
from bootstrap.claim import AUTH_GRACE_AFTER_BOOT_SECONDS
from bootstrap.config import parse_config
from bootstrap.errors import Terminated
from bootstrap.interrupts import INTERRUPTS
from bootstrap.reclaim import another_attempt_fits
from tests.unit.test_bootstrap_fakes import (
    AL2023_TABLE,
    OTHER,
    SELF,
    Rig,
    client_error,
)

HOOK_660 = {"auto_scaling_group": "svc-asg", "hook": "svc-launch", "timeout_seconds": 660}
SIGNAL = {"stack": "EipReclaim-web", "resource": "GroupASG0123ABCD"}
METRICS = {"namespace": "EipReclaim", "service": "web"}


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def _validation(message: str) -> ClientError:
    return ClientError({"Error": {"Code": "ValidationError", "Message": message}}, "Op")


def _results(rig: Rig) -> list[str]:
    return [c["LifecycleActionResult"] for c in rig.autoscaling.completed]


# 1. A stop inside a library call that wraps every Exception (botocore's URLLib3Session.send does).


def _botocore_like(rig: Rig, signum: int, op: str = "DescribeAddresses") -> None:
    def send(called: str) -> None:
        if called != op:
            return
        try:
            os.kill(os.getpid(), signum)
            time.sleep(0.01)  # the handler runs here, inside the library's try
        except Exception as err:
            raise HTTPClientError(error=err) from err

    rig.ec2.before_call = send


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGALRM], ids=lambda s: s.name)
def test_a_stop_inside_a_call_that_wraps_exceptions_is_not_swallowed(
    rig: Rig, capsys: pytest.CaptureFixture[str], signum: int
) -> None:
    _botocore_like(rig, signum)
    assert rig.main() == 75
    err = capsys.readouterr().err
    assert "retry" not in err, err  # before the fix: HTTPClientError, retried, the stop lost
    assert rig.ec2.calls == ["DescribeAddresses"]
    assert rig.netlink.table == AL2023_TABLE
    assert rig.autoscaling.completed == []  # a stop or the deadline of a young run: no ABANDON


def _in_a_region(frame: FrameType) -> bool:
    """Code that makes up an interruptible region: its entry and exit in interrupts.py (not the handlers
    or their set-up), and contextlib's entry and exit where a region is a generator-based manager."""
    code = frame.f_code
    if code.co_filename == interrupts.__file__:
        return code.co_name not in ("_raise", "_on_signal", "_on_alarm", "install", "uninstall", "disarm")
    if code.co_filename == contextlib.__file__ and code.co_name in ("__enter__", "__exit__"):
        generator = getattr(frame.f_locals.get("self"), "gen", None)
        return getattr(getattr(generator, "gi_code", None), "co_filename", None) == interrupts.__file__
    return False


def _run_with_a_stop_at(rig: Rig, target: int | None) -> tuple[int, int]:
    """Run the payload and deliver SIGTERM (the installed handler, with the frame it lands in) at the
    `target`-th line executed in a region's own code; (exit code, lines seen)."""
    seen = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal seen
        if event == "line":
            if seen == target:
                handler = signal.getsignal(signal.SIGTERM)
                assert callable(handler)
                handler(signal.SIGTERM, frame)
            seen += 1
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return local if event == "call" and _in_a_region(frame) else None

    sys.settrace(calls)
    try:
        code = rig.main()
    finally:
        sys.settrace(None)
    return code, seen


def test_a_stop_at_any_line_of_a_region_ends_the_run_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A signal between the blocking call's return and the region's exit (or on its way in) is a stop
    like any other: exit 75 or the run completes, the routes restored, never an exception out of main."""
    (tmp_path / "count").mkdir()
    _, lines = _run_with_a_stop_at(Rig(tmp_path / "count"), None)
    assert lines > 20  # IMDS, the name lookup, the API calls, CONTINUE: every region's entry and exit
    outcomes = set()
    for target in range(lines):
        (tmp_path / str(target)).mkdir()
        rig = Rig(tmp_path / str(target))
        code, _ = _run_with_a_stop_at(rig, target)  # before the fix: Interrupt escaped main (exit 1)
        err = capsys.readouterr().err
        assert code in (0, 75), err
        assert code == 0 or "signal SIGTERM received" in err, err
        assert rig.netlink.table == AL2023_TABLE, err
        assert not rig.journal.exists()
        assert rig.autoscaling.completed == [] or code == 0  # a stop never abandons
        outcomes.add(code)
    assert 75 in outcomes


def test_a_name_lookup_that_hangs_is_cut_short_by_a_stop() -> None:
    release = threading.Event()

    def hanging(*args: Any) -> list[Any]:
        release.wait(30)
        return []

    resolver = resolve.BoundedResolver(hanging, timeout=30)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    INTERRUPTS.install(60)
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Terminated):
            resolver.getaddrinfo("ec2.us-east-1.amazonaws.com", 443)
    finally:
        INTERRUPTS.uninstall()
        release.set()
    assert time.monotonic() - started < 1.3


def test_a_name_lookup_that_hangs_times_out_and_answers_are_kept() -> None:
    calls: list[str] = []

    def lookup(host: str, *args: Any) -> list[Any]:
        calls.append(host)
        if host == "slow.example":
            time.sleep(5)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.10", 443))]

    resolver = resolve.BoundedResolver(lookup, timeout=0.2)
    with pytest.raises(socket.gaierror, match=r"took over 0\.2 s"):
        resolver.getaddrinfo("slow.example", 443)
    assert resolver.ipv4("api.example") == "192.0.2.10"
    assert resolver.ipv4("api.example") == "192.0.2.10"
    assert calls.count("api.example") == 1


def test_the_resolver_serves_the_whole_process_while_installed() -> None:
    resolver = resolve.BoundedResolver(lambda *a: [(2, 1, 6, "", ("192.0.2.9", 80))])
    real = socket.getaddrinfo
    with resolve.installed(resolver):
        assert socket.getaddrinfo("anything.example", 80)[0][4][0] == "192.0.2.9"
    assert socket.getaddrinfo is real


# 4. CONTINUE: through the detour, retried, "no active action" is done, and once done never sent again.


def test_continue_is_retried_through_the_detour(rig: Rig) -> None:
    at_call: list[str | None] = []
    failures = [client_error("Throttling")] * 2

    def flaky(result: str) -> None:
        at_call.append(next(r.gateway for r in rig.netlink.table if r.dst == "0.0.0.0/0"))
        if failures:
            raise failures.pop()

    rig.autoscaling.before_call = flaky
    assert rig.main() == 0
    assert at_call == ["10.0.0.4"] * 3
    assert _results(rig) == ["CONTINUE"]


def test_no_active_lifecycle_action_is_done_and_the_timer_then_stops_asking(rig: Rig) -> None:
    # aws-facts: facts-no-active-lifecycle-action
    asked: list[str] = []
    rig.autoscaling.before_call = asked.append
    rig.autoscaling.error = _validation("No active Lifecycle Action found with instance ID i-0123")
    assert rig.main() == 0
    assert asked == ["CONTINUE"]
    # The re-check timer's run: the address is held, and the action is known to be complete.
    rig.ec2.address["InstanceId"] = SELF
    assert rig.main() == 0
    assert asked == ["CONTINUE"]


def test_a_completed_continue_is_not_sent_again_by_the_timer(rig: Rig) -> None:
    assert rig.main() == 0
    assert rig.main() == 0
    assert _results(rig) == ["CONTINUE"]


# 5. ABANDON only when the outcome is final.


def test_the_hook_window_arithmetic() -> None:
    config = parse_config(
        {
            "version": 1,
            "region": "us-east-1",
            "allocation_id": "eipalloc-0123",
            "nat_by_subnet": {"subnet-0aaa": "10.0.0.4"},
            "lifecycle_hook": HOOK_660,
            "deadline_seconds": 240,
        }
    )
    # First run fails at its deadline, 270 s after boot: 30 + 270 + 30 + 240 + 15 = 585 <= 660.
    assert another_attempt_fits(config, 270)
    # The restarted run fails at about 540 s: 30 + 540 + 30 + 240 + 15 = 855 > 660.
    assert not another_attempt_fits(config, 540)
    assert another_attempt_fits(config, 345) and not another_attempt_fits(config, 346)


@pytest.mark.parametrize(
    ("uptime", "abandoned"), [(60.0, False), (600.0, True)], ids=["restart-fits", "window-spent"]
)
def test_a_transient_failure_abandons_only_when_no_restart_fits(
    rig: Rig, uptime: float, abandoned: bool
) -> None:
    rig.clock.boot = rig.clock.now - uptime
    rig.ec2.errors["DescribeAddresses"] = [client_error("RequestLimitExceeded")] * 10_000
    assert rig.main(config=rig.config(deadline_seconds=30, lifecycle_hook=HOOK_660)) == 75
    assert _results(rig) == (["ABANDON"] if abandoned else [])


def test_a_permanent_error_abandons_at_once_with_the_failure_signal_and_metric(rig: Rig) -> None:
    # aws-facts: facts-error-allocation-not-found, payload-signal-resource-failure
    rig.ec2.errors["DescribeAddresses"] = [client_error("InvalidAllocationID.NotFound")]
    assert rig.main(config=rig.config(signal=SIGNAL, metrics=METRICS)) == 3
    assert _results(rig) == ["ABANDON"]
    assert [c["Status"] for c in rig.cloudformation.calls] == ["FAILURE"]
    assert [d["MetricName"] for c in rig.cloudwatch.calls for d in c["MetricData"]] == ["Abandoned"]


def test_no_abandon_after_a_verified_association(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    from bootstrap import routes
    from bootstrap.route_model import RouteError

    def broken_restore(netlink: Any, plan: Any) -> None:
        raise RouteError("routes: not restored as journaled: test")

    monkeypatch.setattr(routes, "restore", broken_restore)
    rig.clock.boot = rig.clock.now - 600  # a window already spent would abandon a transient failure
    assert rig.main(config=rig.config(lifecycle_hook=HOOK_660)) == 75
    assert rig.ec2.address["InstanceId"] == SELF
    assert _results(rig) == ["CONTINUE"]


# 6. First boot: IAM and the clock settle, the role's credentials appear.


@pytest.mark.parametrize("code", ["AuthFailure", "UnauthorizedOperation", "RequestExpired"])
def test_auth_errors_early_in_the_first_boot_are_retried(rig: Rig, code: str) -> None:
    # aws-facts: facts-error-auth
    rig.clock.boot = rig.clock.now - 20
    rig.ec2.errors["AssociateAddress"] = [client_error(code, 403)] * 3
    assert rig.main() == 0
    assert rig.ec2.calls.count("AssociateAddress") == 4


def test_auth_errors_past_the_grace_window_exit_3_with_the_reason(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    # aws-facts: facts-error-auth
    rig.clock.boot = rig.clock.now - 20
    rig.ec2.errors["AssociateAddress"] = [client_error("UnauthorizedOperation", 403)] * 10_000
    assert rig.main() == 3
    assert rig.clock.uptime() >= AUTH_GRACE_AFTER_BOOT_SECONDS
    assert "UnauthorizedOperation" in capsys.readouterr().err.strip().splitlines()[-1]


def test_no_credentials_early_in_the_first_boot_are_waited_for(rig: Rig) -> None:
    rig.clock.boot = rig.clock.now - 20
    rig.ec2.errors["DescribeAddresses"] = [NoCredentialsError()] * 2
    assert rig.main() == 0


def test_no_credentials_past_the_grace_window_exit_3(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    rig.ec2.errors["DescribeAddresses"] = [NoCredentialsError()]
    assert rig.main() == 3
    assert "no role credentials" in capsys.readouterr().err


def test_role_credentials_not_served_yet_are_asked_for_again(rig: Rig) -> None:
    rig.clock.boot = rig.clock.now - 20
    creds, answers = rig.imds.creds, [None, None]

    class Late:
        def __call__(self) -> Any:
            return answers.pop(0) if answers else creds

    rig.imds.credentials = Late()  # type: ignore[method-assign]
    assert rig.main() == 0
    assert rig.clock.slept.count(1.0) >= 2


# 7. The verify window is time, not a number of reads.


def test_a_verify_that_lags_for_eight_seconds_does_not_reassociate(rig: Rig) -> None:
    lag_until = [0.0]

    def lagging(op: str) -> None:
        if op == "AssociateAddress":
            lag_until[0] = rig.clock.now + 8
        elif op == "DescribeAddresses" and rig.clock.now < lag_until[0]:
            rig.ec2.address["InstanceId"] = OTHER  # the read still shows the holder it replaced

    rig.ec2.before_call = lagging

    def describe(AllocationIds: list[str]) -> dict[str, Any]:
        reply = type(rig.ec2).describe_addresses(rig.ec2, AllocationIds)
        if rig.clock.now >= lag_until[0] and lag_until[0]:
            reply["Addresses"][0]["InstanceId"] = SELF
        return reply

    rig.ec2.describe_addresses = describe  # type: ignore[method-assign]
    assert rig.main() == 0
    assert rig.ec2.calls.count("AssociateAddress") == 1
    assert rig.ec2.calls.count("DescribeAddresses") > 5  # more reads than the old fixed count allowed


# 8. Equal launch times: the instance id breaks the tie, the same way on both.


@pytest.mark.parametrize(("me", "holder", "yields"), [(SELF, OTHER, True), (OTHER, SELF, False)])
def test_equal_launch_times_are_broken_by_instance_id(rig: Rig, me: str, holder: str, yields: bool) -> None:
    from dataclasses import replace

    rig.imds.identity_value = replace(rig.imds.identity_value, instance_id=me)
    rig.ec2.address["InstanceId"] = holder
    same = "2026-11-30T12:00:00+00:00"
    tags = [{"Key": "aws:autoscaling:groupName", "Value": "svc-asg"}]
    rig.ec2.instances = {
        i: {"InstanceId": i, "LaunchTime": same, "State": {"Name": "running"}, "Tags": tags}
        for i in (me, holder)
    }
    assert rig.main() == 0
    assert rig.ec2.address["InstanceId"] == (holder if yields else me)


# 9. The state directory: short writes, stray temporary files, a full or read-only directory.


def test_a_short_write_is_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:7])))
    journal = state.Journal(str(tmp_path))
    journal.write({"plan": {"nat": "10.0.0.4", "pad": "x" * 100}})
    monkeypatch.undo()
    assert journal.read() == {"version": 1, "plan": {"nat": "10.0.0.4", "pad": "x" * 100}}


def test_stray_temporary_files_are_removed(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    directory = Path(rig.journal.directory)
    directory.mkdir(parents=True)
    ours = ["routes.json.4242.tmp", "claimed.done.4243.tmp", "lifecycle.done.17.tmp", "signal.done.9.tmp"]
    for name in ours:
        (directory / name).write_text("{")
    assert rig.main() == 0
    assert not any((directory / name).exists() for name in ours)
    err = capsys.readouterr().err
    assert all(f"removed {name}" in err for name in ours)


def test_only_the_payloads_own_temporary_files_are_removed(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    """The watchdog writes its count and its mark through temporary files in the same directory, without
    the lock: one that is being written while the payload runs is not the payload's to remove."""
    from bootstrap import watchdog

    directory = Path(rig.journal.directory)
    directory.mkdir(parents=True)
    others = [
        f"{watchdog.FAILURES_FILE}.4244.tmp",
        f"{watchdog.REPORTED_MARK}.done.4245.tmp",
        "notes.tmp",
        "routes.json.tmp",  # not a name the payload writes (no process id)
        "routes.json.42x.tmp",
    ]
    for name in others:
        (directory / name).write_text("2")
    assert rig.main() == 0
    assert all((directory / name).exists() for name in others)  # before the fix: every *.tmp removed
    assert "state: removed" not in capsys.readouterr().err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
def test_a_full_or_read_only_state_directory_is_one_line_and_75(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], code: int
) -> None:
    def refuse(*args: Any) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(state, "write_atomically", refuse)
    assert rig.main() == 75
    assert rig.netlink.table == AL2023_TABLE
    assert rig.ec2.calls == []
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"journal: cannot write {rig.journal.path}: {os.strerror(code)}" in last and "(exit 75)" in last
    assert rig.autoscaling.completed == []  # transient, a restart fits: no ABANDON


def test_a_failed_journal_delete_after_success_costs_nothing(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(self: state.Journal) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(state.Journal, "delete", refuse)
    assert rig.main() == 0
    assert _results(rig) == ["CONTINUE"]
    assert "journal: cannot remove" in capsys.readouterr().err


# The stack's signal and the CloudWatch metrics.


def test_success_signals_the_stack_and_publishes_the_heal(rig: Rig) -> None:
    assert rig.main(config=rig.config(signal=SIGNAL, metrics=METRICS)) == 0
    assert rig.cloudformation.calls == [
        {
            "StackName": "EipReclaim-web",
            "LogicalResourceId": "GroupASG0123ABCD",
            "UniqueId": SELF,
            "Status": "SUCCESS",
        }
    ]
    data = rig.cloudwatch.calls[0]["MetricData"]
    assert rig.cloudwatch.calls[0]["Namespace"] == "EipReclaim"
    assert [d["MetricName"] for d in data] == ["Healed", "HealSeconds"]
    assert all(d["Dimensions"] == [{"Name": "Service", "Value": "web"}] for d in data)


def test_heal_seconds_end_at_the_verify(rig: Rig) -> None:
    """HealSeconds is payload start -> the association verified, not counting CONTINUE, the signal and
    the restore that follow it (aws-facts: payload-describe-addresses-verify)."""

    def api_second(op: str) -> None:
        rig.clock.now += 1.0  # each EC2 call takes a second: the verify's DescribeAddresses ends at 4 s

    def slow_report(result: str) -> None:
        rig.clock.now += 10.0

    def slow_restore(command: str, route: Any) -> None:
        if "AssociateAddress" in rig.ec2.calls:
            rig.clock.now += 0.5  # each route change of the restore

    rig.ec2.before_call = api_second
    rig.autoscaling.before_call = slow_report
    rig.netlink.on_change = slow_restore
    assert rig.main(config=rig.config(signal=SIGNAL, metrics=METRICS)) == 0
    assert rig.ec2.calls == [
        "DescribeAddresses",
        "DescribeInstances",
        "AssociateAddress",
        "DescribeAddresses",
    ]
    published = {d["MetricName"]: d["Value"] for d in rig.cloudwatch.calls[0]["MetricData"]}
    assert published["HealSeconds"] == 4.0  # before the fix: 4 s + CONTINUE's 10 s + the restore's


def test_a_stack_that_cannot_be_signaled_is_done(rig: Rig) -> None:
    # aws-facts: facts-signal-outside-deployment
    rig.cloudformation.errors = [
        _validation("Stack arn:aws:cloudformation:x is in UPDATE_COMPLETE state and cannot be signaled")
    ]
    assert rig.main(config=rig.config(signal=SIGNAL)) == 0
    rig.ec2.address["InstanceId"] = SELF
    assert rig.main(config=rig.config(signal=SIGNAL)) == 0
    assert rig.cloudformation.calls == []  # answered once, never asked again


def test_an_already_held_address_publishes_no_heal(rig: Rig) -> None:
    rig.ec2.address["InstanceId"] = SELF
    assert rig.main(config=rig.config(metrics=METRICS)) == 0
    assert rig.cloudwatch.calls == []


def test_the_pretended_uptime_is_a_test_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bootstrap.cli import main, parse_uptime
    from bootstrap.clock import SystemClock

    assert parse_uptime("600") == 600.0
    assert SystemClock(600.0).uptime() == pytest.approx(600.0, abs=1.0)
    monkeypatch.setenv("EIP_RECLAIM_TEST_UPTIME", "12")
    rig = Rig(tmp_path)
    assert main(["--config", rig.config(), "--dry-run"], deps=rig.deps()) == 0
    assert "EIP_RECLAIM_TEST_UPTIME ignored" in capsys.readouterr().err
    monkeypatch.setenv("EIP_RECLAIM_TEST_UPTIME", "soon")
    assert main(["--config", rig.config(test=True), "--dry-run"], deps=rig.deps()) == 2
