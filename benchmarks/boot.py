"""Boot figures, measured in the VPC lab with instances that boot under systemd; prints JSON. Needs root.

- first boot: the user data's start (cloud-init's final stage starting it) to the address held (the
  payload's "verified" line, after DescribeAddresses shows the association), and the payload's share:
  its own start (where its `+N ms` clock starts, once Python runs it) to the same moment;
- installed boot: a reboot of an installed instance whose address was taken meanwhile (the case of a
  warm-pool start or a reboot): systemd's start of the boot unit to the address held, the payload's
  share of it, and the rest (systemd's sandbox, credential and dynamic user, and Python's start);
- for reference, the container's start to systemd's start of the unit at that reboot (what a boot
  costs before the unit runs here; on EC2 the instance's own boot comes before it).

Each figure is the median of N runs (first boot and reboot of a new instance each run, alternating AZs).
The payload is the shipped bundle, installed by the user data, run by the container's python3: CPython
3.9 when this machine has one, else this machine's python3 (the JSON's `python` says which).

    sudo python -m benchmarks.boot [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from benchmarks.heal import summary
from tests import netns
from tests.lab import boot, vpc

VERIFIED = "ec2: verified:"
# The payload's log prefix: milliseconds since it started (bootstrap.cli.ElapsedFormatter).
ELAPSED = re.compile(r"^\+\s*(\d+) ms ")


def held_at(machine: boot.Machine, after: float) -> tuple[float, float]:
    """When the boot unit's payload started its clock and when it logged the address verified as held
    (monotonic). Its lines carry `+N ms` since its start: the first line, less N, is that start."""
    lines = machine.journal(f"_SYSTEMD_UNIT={boot.BOOT_SERVICE}", "_COMM=python3")
    found = [e for e in lines if VERIFIED in e["MESSAGE"] and boot.monotonic(e) > after]
    if not found:
        said = [e["MESSAGE"] for e in lines]
        raise RuntimeError(f"bench: the boot unit never held the address: {said[-5:]}")
    held = found[0]
    first = min((e for e in lines if e["_PID"] == held["_PID"]), key=boot.monotonic)
    elapsed = ELAPSED.match(first["MESSAGE"])
    if elapsed is None:
        raise RuntimeError(f"bench: the payload's first line has no elapsed time: {first['MESSAGE']!r}")
    return boot.monotonic(first) - int(elapsed.group(1)) / 1000, boot.monotonic(held)


def seconds(state: dict[str, str], key: str) -> float:
    return int(state[key]) / 1e6


def one_run(lab: vpc.Lab, image: boot.Image, az: int) -> dict[str, float]:
    with boot.booting(lab, image) as make:
        instance, machine = make(az)
        first = machine.boot()
        state = machine.wait_unit_done(boot.BOOT_SERVICE, first.started, timeout=300)
        if state["ExecMainStatus"] != "0":
            raise RuntimeError(
                f"bench: first boot of {instance.instance_id} exited {state['ExecMainStatus']}"
            )
        user_data = machine.show(boot.CLOUD_FINAL, "ExecMainStartTimestampMonotonic")
        payload_start, held = held_at(machine, first.started)
        first_boot = held - seconds(user_data, "ExecMainStartTimestampMonotonic")
        first_payload = held - payload_start

        machine.poweroff()
        ec2 = lab.ec2()

        def disassociate() -> None:
            for address in ec2.describe_addresses(PublicIps=[vpc.EIP])["Addresses"]:
                if "AssociationId" in address:
                    ec2.disassociate_address(AssociationId=address["AssociationId"])

        lab.in_internet(disassociate)
        lab.sync_gateway()
        again = machine.boot()
        state = machine.wait_unit_done(boot.BOOT_SERVICE, again.started, timeout=300)
        if state["ExecMainStatus"] != "0":
            raise RuntimeError(f"bench: reboot of {instance.instance_id} exited {state['ExecMainStatus']}")
        payload_start, held = held_at(machine, again.started)
        # Leaving "inactive": systemd's start job, before its sandbox, credentials and dynamic user.
        unit_start = seconds(
            machine.show(boot.BOOT_SERVICE, "InactiveExitTimestampMonotonic"),
            "InactiveExitTimestampMonotonic",
        )
        result = {
            "first_boot_s": first_boot,
            "first_boot_payload_s": first_payload,
            "installed_boot_s": held - unit_start,
            "installed_boot_payload_s": held - payload_start,
            # systemd's start of the unit (its sandbox, credential, dynamic user) and Python's own start.
            "installed_boot_unit_to_payload_start_s": payload_start - unit_start,
            "container_start_to_unit_start_s": unit_start - again.started,
        }
    lab.reset()
    return result


def measure(runs: int) -> dict[str, Any]:
    _synth_dir, image = boot.shared_image()
    with vpc.build() as lab:
        s3 = boot.S3(lab, image)
        try:
            samples = [one_run(lab, image, az=n % 2) for n in range(runs)]
        finally:
            s3.close()
    figures: dict[str, Any] = {"python": image.python, "runs_per_figure": runs}
    for key in samples[0]:
        figures[key] = summary([s[key] for s in samples])
    shares = {
        "first_boot_payload_share": ("first_boot_payload_s", "first_boot_s"),
        "installed_boot_payload_share": ("installed_boot_payload_s", "installed_boot_s"),
    }
    for name, (part, total) in shares.items():
        figures[name] = round(figures[part]["median"] / figures[total]["median"], 2)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (medians are reported)")
    args = parser.parse_args(argv)
    if not netns.can_run():
        print(f"benchmarks.boot: {netns.HOW_TO_RUN}", file=sys.stderr)
        return 2
    print(json.dumps({"boot": measure(args.runs)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
