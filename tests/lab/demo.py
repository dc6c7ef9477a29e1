"""`make lab`: build the lab, heal an instance, kill it, heal a replacement in the other AZ, and print
the timeline of what the payload, the API, the gateway and the client saw. Needs root.
"""

from __future__ import annotations

import argparse
import sys
import time

from tests import netns
from tests.lab import timeline, vpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--strategy", choices=vpc.STRATEGIES, default=vpc.POLICY_ROUTE, help="how the instances reach the API"
    )
    args = parser.parse_args(argv)
    if not netns.can_run():
        print(f"make lab: {netns.HOW_TO_RUN.replace('make test', 'make lab')}", file=sys.stderr)
        return 1
    netns.remove_stale()
    print("==> synthesizing the default app and building the lab (network namespaces)")
    started = time.monotonic()
    with vpc.build() as lab:
        print(
            f"    built in {time.monotonic() - started:.1f} s; spec: {lab.spec.source};"
            f" strategy: {args.strategy}"
        )
        origin = time.monotonic()
        lab.start_probe()
        first = lab.boot(0, strategy=args.strategy)
        run = first.run_payload()
        healed = _wait_for_client(lab, first)
        lab.kill(first)
        replacement = lab.boot(1, strategy=args.strategy, launched_after=time.time())
        run2 = replacement.run_payload()
        healed2 = _wait_for_client(lab, replacement)
        time.sleep(0.3)  # a few more probes, so the timeline ends on the client's steady view
        print(f"\n==> timeline (seconds since the first boot; client probes every {0.02 * 1000:.0f} ms)\n")
        print(timeline.render(lab, origin))
        print("\n==> summary")
        for label, instance, payload, ok in (
            ("first boot", first, run, healed),
            ("replacement", replacement, run2, healed2),
        ):
            seen = f"{ok - payload.started:.3f} s after its payload started" if ok else "never"
            where = f"{instance.instance_id} in AZ {instance.subnet.az_index}"
            print(
                f"    {label}: {where} exit {payload.returncode} in {payload.seconds:.3f} s; "
                f"client reached it at {vpc.EIP} {seen}"
            )
        success = run.returncode == 0 and run2.returncode == 0 and bool(healed) and bool(healed2)
    left = netns.ours_left()
    print(f"==> lab torn down; namespaces left: {left or 'none'}")
    return 0 if success and not left else 1


def _wait_for_client(lab: vpc.Lab, instance: vpc.Instance) -> float | None:
    after = instance.runs[-1].started
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen = timeline.first_success(lab.dir / "probe.jsonl", instance.instance_id, after)
        if seen:
            return seen
        time.sleep(0.05)
    return None


if __name__ == "__main__":
    sys.exit(main())
