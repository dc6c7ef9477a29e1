"""NAT instances that boot: the synthesized NAT user data and its boot unit under this machine's systemd.

The first NAT boots once and is carried from its first boot to a reboot with the stable interface
still attached; a replacement boots in a world where its predecessor still holds the interface.
The AWS side is moto with EC2's source/dest check rule, reached through the real AWS CLI
(tests/lab/boot_nat.py).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import netns
from tests.lab import boot, boot_nat

pytestmark = pytest.mark.root

NAT_UNIT = "eip-reclaim-nat.service"


@dataclass
class Nat:
    world: boot_nat.NatWorld
    machine: boot.Machine
    first: boot.Boot

    def unit(self, after: float) -> dict[str, str]:
        """The NAT unit's run that started after `after`, once finished."""
        return self.machine.wait_unit_done(NAT_UNIT, after, timeout=240)

    def forwarding(self) -> tuple[str, str, str]:
        """The kernel's forwarding switch, the filter's FORWARD chain and the NAT table, in its namespace."""
        ns = self.world.ns
        return (
            ns.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip(),
            ns.run("iptables", "-S", "FORWARD").stdout,
            ns.run("iptables", "-t", "nat", "-S", "POSTROUTING").stdout,
        )


@contextmanager
def nat_booting(holder: str) -> Iterator[Nat]:
    """A NAT's world (the stable interface free, or held by a predecessor) and its container, booted
    from its user data; everything killed and removed however the block ends."""
    synth_dir, image = boot.shared_image()
    with tempfile.TemporaryDirectory(prefix="eip-reclaim-nat-") as work, netns.netns("natc") as ns:
        world = boot_nat.NatWorld(ns, Path(work), holder)
        disk = boot.Disk(
            user_data=boot_nat.user_data(synth_dir, world.ids["eni"]),
            usr_layer=boot_nat.nat_layer(image, Path(work)),
            binds=image.binds,
            instance_id=world.ids["instance"],
            hostname="ip-10-0-0-20",
            cloud_final_env=(),
        )
        (Path(work) / "disk").mkdir()
        machine = boot.Machine(ns, disk, Path(work) / "disk" / "root", Path(work))
        try:
            yield Nat(world, machine, machine.boot())
        finally:
            machine.kill()


@pytest.fixture(scope="module")
def nat() -> Iterator[Nat]:
    with nat_booting("none") as booted:
        yield booted


def test_first_boot_takes_over_the_stable_interface(nat: Nat) -> None:
    """The user data installs the scripts and the unit and starts it; the unit turns forwarding and the
    filter on, the primary interface's source/dest check off, attaches the stable interface at index 1,
    and reports CONTINUE and SUCCESS once its address is up.

    aws-facts: nat-imds-primary-interface-id, stand-in-awscli-moto."""
    state = nat.unit(nat.first.started)
    said = [e["MESSAGE"] for e in nat.machine.journal(f"_SYSTEMD_UNIT={NAT_UNIT}")]
    assert (state["Result"], state["ExecMainStatus"], state["ActiveState"]) == ("success", "0", "active"), (
        said
    )
    assert "eip-reclaim-nat: forwarding for the VPC at 10.0.0.4" in said
    attachment = nat.world.interface()["Attachment"]
    assert (attachment["InstanceId"], attachment["DeviceIndex"]) == (nat.world.ids["instance"], 1)
    forwarding, rules, masquerade = nat.forwarding()
    assert forwarding == "1"
    assert "-P FORWARD DROP" in rules and "-A FORWARD -d 169.254.0.0/16 -j DROP" in rules
    assert "MASQUERADE" in masquerade
    assert [c["Action"] for c in nat.world.ec2_calls() if c["status"] == 200 and "Attach" in c["Action"]] == [
        "AttachNetworkInterface"
    ]
    assert [r["LifecycleActionResult"] for r in nat.world.log("autoscaling.jsonl")] == ["CONTINUE"]
    assert [r["Status"] for r in nat.world.log("cloudformation.jsonl")] == ["SUCCESS"]


def test_a_reboot_with_the_interface_attached_keeps_the_nat_forwarding(nat: Nat) -> None:
    """From: the first boot done. Powered off (the kernel's forwarding and filter reset as at any
    boot) and booted again with its disk and the interface still attached: the unit succeeds again
    without touching the attachment, forwarding and the filter are back, nothing reports it unhealthy.

    aws-facts: nat-multiple-interfaces-refused, nat-source-dest-check-by-interface (the instance-wide
    source/dest check call, refused with two interfaces attached, failed this boot before the script
    set it by the primary interface's id)."""
    nat.machine.poweroff()
    nat.world.reboot_kernel_state()
    calls_before = len(nat.world.ec2_calls())
    again = nat.machine.boot()
    state = nat.unit(again.started)
    said = [
        e["MESSAGE"]
        for e in nat.machine.journal(f"_SYSTEMD_UNIT={NAT_UNIT}")
        if boot.monotonic(e) > again.started
    ]
    assert (state["Result"], state["ExecMainStatus"], state["ActiveState"]) == ("success", "0", "active"), (
        said
    )
    assert "eip-reclaim-nat: forwarding for the VPC at 10.0.0.4" in said
    second = nat.world.ec2_calls()[calls_before:]
    assert not [c for c in second if c["status"] != 200], second
    assert not [c for c in second if c["Action"] in ("AttachNetworkInterface", "DetachNetworkInterface")]
    forwarding, rules, masquerade = nat.forwarding()
    assert forwarding == "1"
    assert "-P FORWARD DROP" in rules and "MASQUERADE" in masquerade
    assert nat.world.interface()["Attachment"]["InstanceId"] == nat.world.ids["instance"]
    assert not nat.world.log("autoscaling-health.jsonl")
    # The user data ran once: the second boot only ran the unit.
    assert nat.machine.show(boot.CLOUD_FINAL, "ConditionResult")["ConditionResult"] == "no"


def test_a_replacement_takes_the_interface_from_a_predecessor_that_holds_it() -> None:
    """The predecessor still holds the stable interface: the new NAT's unit detaches it (forced), waits
    for it to be available, attaches it to itself, and serves."""
    with nat_booting("other") as replacement:
        state = replacement.unit(replacement.first.started)
        said = [e["MESSAGE"] for e in replacement.machine.journal(f"_SYSTEMD_UNIT={NAT_UNIT}")]
        assert (state["Result"], state["ExecMainStatus"]) == ("success", "0"), said
        actions = [c["Action"] for c in replacement.world.ec2_calls() if c["status"] == 200]
        assert actions.index("DetachNetworkInterface") < actions.index("AttachNetworkInterface")
        attachment = replacement.world.interface()["Attachment"]
        assert attachment["InstanceId"] == replacement.world.ids["instance"]
        assert replacement.forwarding()[0] == "1"
