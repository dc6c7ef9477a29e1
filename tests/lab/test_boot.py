"""Instances that boot: the user data and the systemd units under this machine's systemd 252, in the lab.

One instance (a container joined to its lab namespace) is booted once and carried through the
scenarios in order, as one instance lives: its first boot runs the synthesized user data, the re-check
finds the address held, a stop interrupts a run in its detour, a transient failure is restarted, and a
reboot heals from the installed units alone. Each scenario states what it starts from.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab import boot, vpc

pytestmark = pytest.mark.root

# systemd's dynamic users come from this range (systemd's DYNAMIC_UID_MIN/MAX, docs: "Users, Groups,
# UIDs and GIDs on systemd Systems").
DYNAMIC_UIDS = range(61184, 65520)
CAP_NET_ADMIN = 12


class Booted:
    """The carried instance and what the scenarios need around it."""

    def __init__(
        self,
        *,
        lab: vpc.Lab,
        image: boot.Image,
        instance: vpc.Instance,
        machine: boot.Machine,
        before: dict[str, str],
        first: boot.Boot,
    ) -> None:
        self.lab = lab
        self.image = image
        self.machine = machine
        self.instance = instance
        self.before = before  # its host state before anything ran
        self.first = first

    def payload_lines(self, unit: str = boot.BOOT_SERVICE, since: float = 0.0) -> list[dict[str, Any]]:
        return [
            e
            for e in self.machine.journal(f"_SYSTEMD_UNIT={unit}", "_COMM=python3")
            if boot.monotonic(e) > since
        ]

    def unassociate(self) -> None:
        """The Elastic IP is taken from this instance behind its back (as by another member's claim)."""
        ec2 = self.lab.ec2()

        def disassociate() -> None:
            for address in ec2.describe_addresses(PublicIps=[vpc.EIP])["Addresses"]:
                if "AssociationId" in address:
                    ec2.disassociate_address(AssociationId=address["AssociationId"])

        self.lab.in_internet(disassociate)
        self.lab.sync_gateway()
        assert self.lab.holder() is None


@pytest.fixture(scope="module")
def booted(built_lab: vpc.Lab) -> Iterator[Booted]:
    lab = built_lab
    lab.reset()
    _synth_dir, image = boot.shared_image()
    s3 = boot.S3(lab, image)
    try:
        with boot.booting(lab, image) as make:
            instance, machine = make(0)
            before = instance.host_state()
            first = machine.boot()
            yield Booted(lab=lab, image=image, instance=instance, machine=machine, before=before, first=first)
    finally:
        s3.close()
        # The containers are dead; the namespaces go now, not at the next scenario's reset.
        lab.reset()


def test_first_boot_runs_the_user_data_and_heals(booted: Booted) -> None:
    """The synthesized user data, run once as root at first boot, fetches and checks the bundle from S3,
    installs it and its configuration, enables and starts the units; systemd's run of the boot unit takes
    the address through the detour and leaves the routes as they were."""
    machine, lab = booted.machine, booted.lab
    state = machine.wait_unit_done(boot.BOOT_SERVICE, booted.first.started, timeout=180)
    user_data = machine.show(boot.CLOUD_FINAL, "Result", "ExecMainStatus")
    said = [e["MESSAGE"] for e in machine.journal("SYSLOG_IDENTIFIER=eip-reclaim-user-data")]
    assert user_data == {"Result": "success", "ExecMainStatus": "0"}, said
    assert [m for m in said if m.startswith(("fetching", "installed", "wrote", "started"))] == [
        f"fetching s3://{booted.image.bucket}/{booted.image.key}",
        "installed /opt/eip-reclaim",
        "wrote /etc/eip-reclaim/config.json",
        f"started {boot.BOOT_SERVICE}",
    ]
    assert (state["Result"], state["ExecMainStatus"]) == ("success", "0"), booted.payload_lines()
    assert lab.holder() == booted.instance.instance_id
    assert lab.client_get() == booted.instance.instance_id
    assert booted.instance.host_state() == booted.before
    # Through its AZ's NAT, as the lab's other scenarios see it.
    sources = {c["src"] for c in lab.ec2_calls() if c["access_key"] == booted.instance.access_key_id}
    assert sources == {vpc.nat_uplink_ip(0)}
    enabled = machine.run("systemctl", "is-enabled", boot.BOOT_SERVICE, "eip-reclaim.timer").stdout.split()
    assert enabled == ["enabled", "enabled"]
    assert machine.run("systemctl", "is-active", "eip-reclaim.timer").stdout.strip() == "active"
    # Only systemd runs the payload: the user data started the unit and did not wait for it.
    assert {e.get("_SYSTEMD_UNIT") for e in booted.payload_lines()} == {boot.BOOT_SERVICE}


def test_the_payload_runs_as_the_dynamic_user_with_only_cap_net_admin(booted: Booted) -> None:
    """What journald recorded of the payload's own log lines: a uid from systemd's dynamic range, the
    unit's user name for it, and CAP_NET_ADMIN as the only effective capability."""
    lines = booted.payload_lines()
    assert lines, "the payload logged nothing"
    uids = {int(e["_UID"]) for e in lines}
    caps = {int(e["_CAP_EFFECTIVE"], 16) for e in lines}
    assert len(uids) == 1 and uids <= set(DYNAMIC_UIDS), uids
    assert caps == {1 << CAP_NET_ADMIN}, [hex(c) for c in caps]
    assert {e["_GID"] for e in lines} == {str(uid) for uid in uids}


def test_the_recheck_unit_finds_the_address_held_and_changes_nothing(booted: Booted) -> None:
    """From: the instance holds the address. The timer's unit, started now, says so and changes nothing;
    it finds the boot unit's runtime directory (lock, state) as its own, though it is another unit."""
    machine, lab = booted.machine, booted.lab
    assert lab.holder() == booted.instance.instance_id
    calls_before = len(lab.ec2_calls())
    started = time.monotonic()
    machine.run("systemctl", "start", boot.RECHECK_SERVICE, timeout=120)
    state = machine.wait_unit_done(boot.RECHECK_SERVICE, started)
    said = [e["MESSAGE"] for e in booted.payload_lines(boot.RECHECK_SERVICE, since=started)]
    assert (state["Result"], state["ExecMainStatus"]) == ("success", "0"), said
    assert any("is already held by this instance; no change" in m for m in said), said
    assert any("lock: /run/eip-reclaim/lock held" in m for m in said), said
    assert not [c for c in lab.ec2_calls()[calls_before:] if c["action"] == "AssociateAddress"]
    assert booted.instance.host_state() == booted.before
    assert lab.holder() == booted.instance.instance_id


def test_stop_during_the_detour_restores_routing_within_the_stop_timeout(booted: Booted) -> None:
    """From: the address taken away. A run blocked in AssociateAddress, inside its detour, is stopped
    with `systemctl stop`: SIGTERM makes it restore the routes and exit before TimeoutStopSec (no
    SIGKILL), and systemd does not start it again."""
    machine, lab = booted.machine, booted.lab
    booted.unassociate()
    stop_timeout = int(machine.show(boot.BOOT_SERVICE, "TimeoutStopUSec")["TimeoutStopUSec"].rstrip("s"))
    lab.set_api_faults(delay={"AssociateAddress": 60})
    try:
        started = time.monotonic()
        machine.run("systemctl", "start", "--no-block", boot.BOOT_SERVICE)
        vpc.wait_for(
            lambda: any("associating" in e["MESSAGE"] for e in booted.payload_lines(since=started)),
            "the run's AssociateAddress",
            timeout=60,
        )
        assert booted.instance.rules() != booted.before["rules"]  # the detour's rule is in place
        stopping = time.monotonic()
        machine.run("systemctl", "stop", boot.BOOT_SERVICE, timeout=stop_timeout + 30)
        stopped = time.monotonic() - stopping
    finally:
        lab.set_api_faults()
    state = machine.show(boot.BOOT_SERVICE, "Result", "ActiveState", "NRestarts")
    said = [e["MESSAGE"] for e in booted.payload_lines(since=started)]
    assert stopped < stop_timeout, said
    assert state["Result"] != "timeout", (state, said)
    assert state["ActiveState"] in ("inactive", "failed"), state
    assert booted.instance.host_state() == booted.before, said
    assert lab.holder() is None
    time.sleep(1)
    assert machine.show(boot.BOOT_SERVICE, "ActiveState")["ActiveState"] in ("inactive", "failed")


def test_exit_75_is_restarted_within_the_start_limit(booted: Booted) -> None:
    """From: the address not held. With the AZ's NAT down the run exits 75 (transient) inside its
    deadline; systemd restarts it after RestartSec, within StartLimitBurst, and with the NAT back the
    restarted run heals."""
    machine, lab = booted.machine, booted.lab
    assert lab.holder() is None
    limits = machine.show(boot.BOOT_SERVICE, "StartLimitBurst", "RestartUSec")
    lab.set_nat_down(0)
    try:
        started = time.monotonic()
        machine.run("systemctl", "reset-failed", boot.BOOT_SERVICE, check=False)
        machine.run("systemctl", "start", "--no-block", boot.BOOT_SERVICE)
        vpc.wait_for(
            lambda: (
                machine.show(boot.BOOT_SERVICE, "ExecMainStatus", "SubState")["SubState"] == "auto-restart"
            ),
            "the first run's exit and the scheduled restart",
            timeout=60,
        )
        first = machine.show(boot.BOOT_SERVICE, "ExecMainStatus")
    finally:
        lab.set_nat_down(0, down=False)
    assert first["ExecMainStatus"] == "75"
    state = machine.wait_unit_done(boot.BOOT_SERVICE, time.monotonic(), timeout=120)
    said = [e["MESSAGE"] for e in booted.payload_lines(since=started)]
    assert (state["Result"], state["ExecMainStatus"]) == ("success", "0"), said
    assert int(state["NRestarts"]) == 1 < int(limits["StartLimitBurst"]), state
    assert lab.holder() == booted.instance.instance_id
    assert booted.instance.host_state() == booted.before


def test_a_reboot_heals_from_the_installed_units_without_the_user_data(booted: Booted) -> None:
    """From: the instance holds the address. It is powered off, the address is taken away meanwhile,
    and it boots again with its disk: the user data does not run again; the boot unit takes the address."""
    machine, lab = booted.machine, booted.lab
    machine.poweroff()
    booted.unassociate()
    again = machine.boot()
    state = machine.wait_unit_done(boot.BOOT_SERVICE, again.started, timeout=120)
    said = [e["MESSAGE"] for e in booted.payload_lines(since=again.started)]
    assert (state["Result"], state["ExecMainStatus"]) == ("success", "0"), said
    assert lab.holder() == booted.instance.instance_id
    assert lab.client_get() == booted.instance.instance_id
    assert booted.instance.host_state() == booted.before
    fetched = [
        e
        for e in machine.journal("SYSLOG_IDENTIFIER=eip-reclaim-user-data")
        if e["MESSAGE"].startswith("fetching")
    ]
    assert len(fetched) == 1 and boot.monotonic(fetched[0]) < again.started
    skipped = machine.show(boot.CLOUD_FINAL, "ConditionResult")
    assert skipped["ConditionResult"] == "no"
    assert machine.run("systemctl", "is-active", "eip-reclaim.timer").stdout.strip() == "active"
