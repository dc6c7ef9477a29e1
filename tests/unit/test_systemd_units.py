"""The systemd units: systemd's own verifier, and the directives the payload's contract depends on."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stacks import user_data
from stacks.payload_config import DEADLINE_SECONDS

UNITS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
BOOT = "eip-reclaim.service"
RECHECK = "eip-reclaim-recheck.service"
TIMER = "eip-reclaim.timer"
WATCHDOG = "eip-reclaim-watchdog.service"
WATCHDOG_TIMER = "eip-reclaim-watchdog.timer"
# Directives that differ on purpose between the boot run and the timer's re-check.
RESTART_KEYS = {"Restart", "RestartSec", "RestartPreventExitStatus"}
# Every unit of the bundle below 2.0 (network access and CAP_NET_ADMIN keep it above 1.0).
EXPOSURE_LIMIT = 2.0
# The dynamic user both services share, and with it the runtime directory.
SERVICE_USER = "eip-reclaim"


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists: systemd allows a key more than once."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: directive outside a section: {line}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= expected once, found {found}"
    return found[0]


def words(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> set[str]:
    return {w for v in values(unit, section, key) for w in v.split()}


def seconds(value: str) -> int:
    units = {"s": 1, "min": 60, "h": 3600}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return int(value[: -len(suffix)]) * factor
    return int(value)


@pytest.fixture(scope="module")
def units() -> dict[str, dict[str, list[tuple[str, str]]]]:
    return {path.name: parse_unit(path) for path in sorted(UNITS_DIR.iterdir())}


def verify(unit_files: list[Path], tmp_path: Path) -> str:
    """Run ``systemd-analyze verify`` on units installed in a throwaway root; return what it complained about.

    The root holds a copy of this machine's systemd units (for network-online.target and friends) and
    the interpreter path the units name, so the check does not depend on what this host has installed.
    Its exit code alone misses unknown keys and unparsable values, which it reports only as warnings.
    """
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found: install systemd (.ci/run does)"
    system_units = next(
        p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()
    )
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in unit_files:
        shutil.copyfile(unit, root / "etc/systemd/system" / unit.name)
    python = root / "usr/bin/python3"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", *(u.name for u in unit_files)],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and not problems:
        problems = f"exit {result.returncode}"
    return problems


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # The units as shipped load cleanly: no unknown directive, no bad value, every referenced unit exists.
    problems = verify(sorted(UNITS_DIR.iterdir()), tmp_path)
    assert problems == ""


def test_verify_catches_what_its_exit_code_alone_misses(tmp_path: Path) -> None:
    # Guards the harness: a misspelt directive must fail the check above, not pass it silently.
    broken = tmp_path / BOOT
    broken.write_text((UNITS_DIR / BOOT).read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    problems = verify(
        [broken, *(UNITS_DIR / name for name in (RECHECK, TIMER, WATCHDOG, WATCHDOG_TIMER))], tmp_path
    )
    assert "NoNewPrivilege" in problems


def test_the_shipped_files_are_the_ones_user_data_enables(units: dict) -> None:
    # User data enables these names; a rename here would leave the instance without its boot run.
    assert set(units) == {BOOT, RECHECK, TIMER, WATCHDOG, WATCHDOG_TIMER}
    assert user_data.BOOT_SERVICE == BOOT
    assert user_data.TIMER == TIMER


def test_boot_service_runs_the_payload_once_after_the_network(units: dict) -> None:
    boot = units[BOOT]
    # A one-shot run at every boot, once the network is up.
    assert one(boot, "Service", "Type") == "oneshot"
    assert "network-online.target" in words(boot, "Unit", "Wants")
    assert "network-online.target" in words(boot, "Unit", "After")
    assert one(boot, "Install", "WantedBy") == "multi-user.target"
    # The contract's command line, with the configuration file the user data writes, handed over as a
    # credential: the file stays root's, the dynamic user reads its private copy in %d.
    assert one(boot, "Service", "ExecStart") == "/usr/bin/python3 -S -m bootstrap --config %d/config.json"
    assert one(boot, "Service", "LoadCredential") == f"config.json:{user_data.CONFIG_PATH}"
    assert f"PYTHONPATH={user_data.INSTALL_DIR}" in values(boot, "Service", "Environment")
    # botocore's credential fetch must not fall back to IMDSv1 either.
    assert "AWS_EC2_METADATA_V1_DISABLED=true" in values(boot, "Service", "Environment")


def test_boot_service_retries_transient_failures_only_and_boundedly(units: dict) -> None:
    boot = units[BOOT]
    # Exit 75 restarts; configuration (2) and permission/not-found (3) never heal by retrying.
    assert one(boot, "Service", "Restart") == "on-failure"
    assert words(boot, "Service", "RestartPreventExitStatus") == {"2", "3"}
    # Bounded: the burst of starts fits inside the window, so the limit trips before the window rolls.
    burst = int(one(boot, "Unit", "StartLimitBurst"))
    window = seconds(one(boot, "Unit", "StartLimitIntervalSec"))
    per_start = seconds(one(boot, "Service", "TimeoutStartSec")) + seconds(one(boot, "Service", "RestartSec"))
    assert 1 < burst <= 10
    assert burst * per_start < window


def test_the_launch_hook_window_counts_the_units_restart_delay(units: dict) -> None:
    # The hook's window (stacks/healing_service.py) is sized for one retry RestartSec after a failure.
    from stacks.healing_service import UNIT_RESTART_SECONDS

    assert seconds(one(units[BOOT], "Service", "RestartSec")) == UNIT_RESTART_SECONDS


def test_start_timeout_is_above_the_payload_deadline(units: dict) -> None:
    # systemd must not kill a run that is still inside its own deadline, nor let a hung one run forever.
    for name in (BOOT, RECHECK):
        timeout = seconds(one(units[name], "Service", "TimeoutStartSec"))
        assert DEADLINE_SECONDS + 60 <= timeout <= 600, name
        # SIGTERM makes the payload restore routes: it gets time before SIGKILL.
        assert seconds(one(units[name], "Service", "TimeoutStopSec")) >= 10


def test_hardening_keeps_route_changes_and_the_journal(units: dict) -> None:
    for name in (BOOT, RECHECK):
        service = units[name]
        assert one(service, "Service", "NoNewPrivileges") == "yes", name
        # Route changes need CAP_NET_ADMIN over netlink; nothing else.
        assert words(service, "Service", "CapabilityBoundingSet") == {"CAP_NET_ADMIN"}, name
        assert {"AF_NETLINK", "AF_INET"} <= words(service, "Service", "RestrictAddressFamilies"), name
        assert one(service, "Service", "ProtectSystem") == "strict", name
        # The route journal: writable, and kept after a run so the next one can restore from it.
        assert one(service, "Service", "RuntimeDirectory") == "eip-reclaim", name
        assert one(service, "Service", "RuntimeDirectoryPreserve") == "yes", name
        # PrivateUsers= would cost the capability in the host's network namespace.
        assert not values(service, "Service", "PrivateUsers"), name
        assert not values(service, "Service", "PrivateNetwork"), name


def test_the_payload_runs_unprivileged_with_only_cap_net_admin(units: dict) -> None:
    for name in (BOOT, RECHECK):
        service = units[name]
        # Not root: a transient user, the same name in both units, so both runs share one uid at a time
        # and systemd hands the preserved runtime directory (journal, lock, marks) from one to the other.
        assert one(service, "Service", "DynamicUser") == "yes", name
        assert one(service, "Service", "User") == SERVICE_USER, name
        # The one capability, raised for the unprivileged process itself (ambient), and nothing to gain.
        assert words(service, "Service", "AmbientCapabilities") == {"CAP_NET_ADMIN"}, name
        assert words(service, "Service", "CapabilityBoundingSet") == {"CAP_NET_ADMIN"}, name
        # What the kernel test (tests/kernel/test_unprivileged.py) emulates and runs the payload under.
        assert one(service, "Service", "MemoryDenyWriteExecute") == "yes", name
        assert one(service, "Service", "ProtectProc") == "invisible", name
        assert one(service, "Service", "ProcSubset") == "pid", name
        assert one(service, "Service", "PrivateMounts") == "yes", name
        assert values(service, "Service", "SystemCallFilter") == [
            "@system-service",
            "~@privileged @resources",
        ], name
        assert one(service, "Service", "SystemCallErrorNumber") == "EPERM", name


def exposure(unit: Path) -> float:
    """``systemd-analyze security --offline=true`` of one unit file: its overall exposure level."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found: install systemd (.ci/run does)"
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


def test_every_service_rates_below_the_exposure_limit() -> None:
    # Measured, not guessed: each service of the bundle (and any added later) stays below 2.0.
    services = sorted(UNITS_DIR.glob("*.service"))
    assert {p.name for p in services} >= {BOOT, RECHECK}
    ratings = {p.name: exposure(p) for p in services}
    print("\nsystemd-analyze security --offline=true: " + ", ".join(f"{n} {r}" for n, r in ratings.items()))
    for name, rating in ratings.items():
        assert rating < EXPOSURE_LIMIT, f"{name}: exposure {rating} (limit {EXPOSURE_LIMIT})"


def test_the_rating_harness_sees_a_weaker_unit(tmp_path: Path) -> None:
    # Guards the parse above: the same unit run as root rates worse.
    weaker = tmp_path / BOOT
    text = (UNITS_DIR / BOOT).read_text()
    weaker.write_text(text.replace("DynamicUser=yes\n", "").replace(f"User={SERVICE_USER}\n", ""))
    assert exposure(weaker) > exposure(UNITS_DIR / BOOT)


def test_recheck_is_the_same_run_without_restarts(units: dict) -> None:
    boot, recheck = units[BOOT], units[RECHECK]
    # Same command, environment and hardening as the boot run: only the retry policy differs.
    assert [kv for kv in recheck["Service"] if kv[0] not in RESTART_KEYS] == [
        kv for kv in boot["Service"] if kv[0] not in RESTART_KEYS
    ]
    # The timer's next tick is the retry; restarts here would count against nothing and pile up.
    assert not values(recheck, "Service", "Restart")
    # Never beside the boot run.
    assert BOOT in words(recheck, "Unit", "After")
    # Started by the timer only.
    assert "Install" not in recheck


def test_timer_rechecks_periodically(units: dict) -> None:
    timer = units[TIMER]
    # The timer drives the re-check unit (its starts do not eat the boot service's start limit).
    assert one(timer, "Timer", "Unit") == RECHECK
    assert (UNITS_DIR / RECHECK).is_file()
    assert 60 <= seconds(one(timer, "Timer", "OnBootSec")) <= 3600
    assert 60 <= seconds(one(timer, "Timer", "OnUnitActiveSec")) <= 3600
    assert seconds(one(timer, "Timer", "RandomizedDelaySec")) > 0
    assert one(timer, "Install", "WantedBy") == "timers.target"


def test_the_watchdog_probes_every_ten_seconds_with_no_capability(units: dict) -> None:
    # Three failures in a row must be noticed in about half a minute, and the probe needs no privilege.
    timer, service = units[WATCHDOG_TIMER], units[WATCHDOG]
    assert values(timer, "Timer", "OnUnitActiveSec") == ["10s"]
    assert values(timer, "Timer", "AccuracySec") == ["1s"]
    assert values(service, "Service", "ExecStart") == [
        "/usr/bin/python3 -S -m bootstrap.watchdog --config %d/config.json"
    ]
    assert values(service, "Service", "CapabilityBoundingSet") == [""]
    assert not values(service, "Service", "AmbientCapabilities")
    # The payload's dynamic user and runtime directory, where the claimed mark is.
    assert values(service, "Service", "User") == [SERVICE_USER]
