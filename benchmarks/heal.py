"""Heal latency, failover downtime and the floor, measured in the VPC lab; prints JSON. Needs root.

- heal latency: the payload's start to the first request of the client in the internet that the
  instance answers at the Elastic IP (the client probes every 20 ms); under the default strategy
  (policy-route) and, in `heal_latency_by_strategy_s`, under each of the lab's strategies
  (policy-route, main-table, ipv6 direct, interface-endpoints direct);
- the payload is the shipped bundle, unpacked and byte-compiled as the user data installs it, run as the
  unit runs it (`python3.9 -S -m bootstrap`), when this machine has a CPython 3.9; else (or with
  `--payload checkout`) this checkout with this interpreter and its venv's botocore (whole models);
- failover downtime: killing the holder to the first answer from the replacement (which boots in the
  other AZ), and the part of it after the replacement's payload started;
- handover gap: a launch-first deploy's overlap (the lab's scenario (a), tests/lab/test_handover.py)
  as a client polling every 50 ms sees it: the time without an answer beyond the poll's own cadence
  while the address moves once from the old instance to the new one (0: no poll went unanswered);
- the floor: a process that only creates the EC2 client and makes the same three API calls, through
  the same NAT from the same namespace, with no routes, IMDS or checks (its detour is set up before
  it starts and not counted).

    sudo make bench            # or: python -m benchmarks.heal --runs 7 [--only handover]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import netns
from tests.kernel import bundled
from tests.lab import handover, timeline, vpc

TARGETS = {
    "heal_latency_median_s": 1.0,
    "heal_to_floor_ratio": 1.5,
    "failover_beyond_payload_start_s": 1.5,
    "handover_gap_s": 1.0,
}


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "runs": [round(v, 3) for v in values],
    }


@dataclass(frozen=True)
class Payload:
    """What the lab's instances run: the shipped bundle (``path``) under ``python``, or this checkout."""

    description: str
    python: str | None = None
    path: Path | None = None

    def boot(
        self, lab: vpc.Lab, az: int, *, strategy: str = vpc.POLICY_ROUTE, launched_after: float | None = None
    ) -> vpc.Instance:
        instance = lab.boot(az, strategy=strategy, launched_after=launched_after)
        if self.python is None or self.path is None:
            return instance
        python, path = self.python, str(self.path)
        checkout_env = instance.payload_env

        def argv(*extra: str, config: Path | None = None) -> list[str]:
            # env -C: `python -m` puts its working directory first on sys.path, and the lab starts the
            # payload in this checkout, whose bootstrap/ would shadow the bundle's.
            return [
                "env", "-C", path, python, "-S", "-m", "bootstrap",
                "--config", str(config or instance.config_path), "--verbose", *extra,
            ]  # fmt: skip

        def env(extra: dict[str, str] | None = None) -> dict[str, str]:
            return {**checkout_env(extra), "PYTHONPATH": path}

        instance.payload_argv = argv  # type: ignore[method-assign]
        instance.payload_env = env  # type: ignore[method-assign]
        return instance


def first_answer(lab: vpc.Lab, instance: vpc.Instance, after: float, timeout: float = 10) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = timeline.first_success(lab.dir / "probe.jsonl", instance.instance_id, after)
        if seen is not None:
            return seen
        time.sleep(0.02)
    raise RuntimeError(f"the client never reached {instance.instance_id} at {vpc.EIP}")


def heal_once(
    lab: vpc.Lab, payload: Payload, az: int, strategy: str = vpc.POLICY_ROUTE
) -> tuple[float, float]:
    """(payload start -> first client answer, payload start -> exit)."""
    lab.reset()
    instance = payload.boot(lab, az, strategy=strategy)
    run = instance.run_payload()
    if run.returncode != 0:
        raise RuntimeError(f"payload exited {run.returncode}:\n{run.stderr}")
    return first_answer(lab, instance, run.started) - run.started, run.seconds


def floor_once(lab: vpc.Lab, az: int) -> float:
    lab.reset()
    instance = lab.boot(az)
    subnet = instance.subnet
    # The detour the payload would make, made beforehand: the floor pays only for Python and the API.
    instance.ns.ip("route", "replace", "default", "via", str(subnet.nat_ip), "dev", "ens5", "metric", "512")
    argv = [
        sys.executable,
        "-m",
        "benchmarks.heal_floor",
        vpc.EC2_URL,
        vpc.REGION,
        lab.allocation_id,
        instance.instance_id,
    ]
    started = time.monotonic()
    done = subprocess.run(
        instance.ns.argv(argv),
        check=False,
        cwd=vpc.REPO,
        env={
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(vpc.REPO),
            "HOME": str(instance.state_dir),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"floor exited {done.returncode}:\n{done.stderr}")
    return seconds


def failover_once(lab: vpc.Lab, payload: Payload, az: int) -> tuple[float, float]:
    """(kill -> first answer from the replacement, replacement's payload start -> that answer)."""
    lab.reset()
    holder = payload.boot(lab, az)
    run = holder.run_payload()
    first_answer(lab, holder, run.started)
    killed = time.monotonic()
    lab.kill(holder)
    replacement = payload.boot(lab, 1 - az)
    run = replacement.run_payload()
    if run.returncode != 0:
        raise RuntimeError(f"replacement's payload exited {run.returncode}:\n{run.stderr}")
    answered = first_answer(lab, replacement, killed)
    return answered - killed, answered - run.started


def handover_once(lab: vpc.Lab, payload: Payload, az: int) -> handover.ClientView:
    """A launch-first deploy: the new version boots beside the old one and takes the address, the old
    one's re-check yields, then the old one is terminated; what the 50 ms client saw."""
    lab.reset()
    old = payload.boot(lab, az)
    handover.tag_launch(lab, old, 1)
    client = handover.start_client(lab)
    try:
        run = old.run_payload()
        if run.returncode != 0:
            raise RuntimeError(f"old instance's payload exited {run.returncode}:\n{run.stderr}")
        handover.wait_for_answer(lab, old, run.started)
        new = payload.boot(lab, 1 - az, launched_after=time.time())
        handover.tag_launch(lab, new, 2)
        run = new.run_payload()
        if run.returncode != 0:
            raise RuntimeError(f"new instance's payload exited {run.returncode}:\n{run.stderr}")
        handover.wait_for_answer(lab, new, run.started)
        recheck = old.run_payload()
        if recheck.returncode != 0 or lab.holder() != new.instance_id:
            raise RuntimeError(f"the old instance's re-check did not yield:\n{recheck.stderr}")
        time.sleep(0.3)
        lab.kill(old)
        time.sleep(0.3)
    finally:
        handover.stop_client(client)
    view = handover.client_view(lab, old, new)
    if view.answered_by != [old.instance_id, new.instance_id]:
        raise RuntimeError(f"the address did not move exactly once: {view.answered_by}")
    return view


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (medians are reported)")
    parser.add_argument(
        "--payload",
        choices=("bundle", "checkout"),
        default="bundle",
        help="the shipped bundle under CPython 3.9 (default, when there is one) or this checkout",
    )
    parser.add_argument("--only", choices=("handover",), help="measure only this figure")
    args = parser.parse_args(argv)
    if not netns.can_run():
        print(f"benchmark: {netns.HOW_TO_RUN.replace('make test', 'make bench')}", file=sys.stderr)
        return 1
    netns.remove_stale()
    python39 = bundled.find_python39() if args.payload == "bundle" else None
    with tempfile.TemporaryDirectory(prefix="eipr-bench-") as tmp, vpc.build() as lab:
        if python39:
            shipped = bundled.unpack(python39, Path(tmp) / "opt-eip-reclaim")
            payload = Payload(
                f"bundle {shipped.manifest['input_hash'][:16]} with {python39} -S", python39, shipped.path
            )
        else:
            note = "" if args.payload == "checkout" else " (no CPython 3.9 here for the bundle)"
            payload = Payload(f"checkout with {sys.executable}{note}")
        lab.start_probe()
        if args.only == "handover":
            heal_once(lab, payload, 0)
            views = [handover_once(lab, payload, k % 2) for k in range(args.runs)]
            print(json.dumps(_handover_report(views, payload.description, args.runs), indent=2))
            return 0
        # One untimed heal first: the page cache then holds what every later run imports.
        heal_once(lab, payload, 0)
        heals = [heal_once(lab, payload, k % 2) for k in range(args.runs)]
        # Each strategy after one untimed heal of its own (its first run loads what only it uses).
        by_strategy: dict[str, list[tuple[float, float]]] = {}
        for strategy in vpc.STRATEGIES:
            heal_once(lab, payload, 0, strategy)
            by_strategy[strategy] = [heal_once(lab, payload, k % 2, strategy) for k in range(args.runs)]
        floors = [floor_once(lab, k % 2) for k in range(args.runs)]
        failovers = [failover_once(lab, payload, k % 2) for k in range(args.runs)]
        handovers = [handover_once(lab, payload, k % 2) for k in range(args.runs)]
        spec_source = lab.spec.source
    heal_latency = summary([h[0] for h in heals])
    floor = summary(floors)
    downtime = summary([f[0] for f in failovers])
    beyond = summary([f[1] for f in failovers])
    ratio = round(heal_latency["median"] / floor["median"], 2)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "lab_spec": spec_source,
        "payload": payload.description,
        "runs": args.runs,
        "heal_latency_s": heal_latency,
        "heal_latency_by_strategy_s": {
            strategy: summary([h[0] for h in runs]) for strategy, runs in by_strategy.items()
        },
        "strategy_egress": {
            strategy: vpc.PAYLOAD_EGRESS[strategy] + (" + dualstack" if strategy == vpc.IPV6 else "")
            for strategy in vpc.STRATEGIES
        },
        "payload_exit_by_strategy_s": {
            strategy: summary([h[1] for h in runs]) for strategy, runs in by_strategy.items()
        },
        "payload_exit_s": summary([h[1] for h in heals]),
        "floor_s": floor,
        "heal_to_floor_ratio": ratio,
        "failover_downtime_s": downtime,
        "failover_beyond_payload_start_s": beyond,
        **_handover_report(handovers, payload.description, args.runs, figures_only=True),
        "targets": TARGETS,
        "met": {
            "heal_latency_median_s": heal_latency["median"] <= TARGETS["heal_latency_median_s"],
            "heal_to_floor_ratio": ratio <= TARGETS["heal_to_floor_ratio"],
            "failover_beyond_payload_start_s": beyond["median"] <= TARGETS["failover_beyond_payload_start_s"],
            "handover_gap_s": statistics.median(v.gap_seconds for v in handovers)
            <= TARGETS["handover_gap_s"],
        },
        "notes": {
            "failover_downtime_s": "includes the lab booting the replacement (namespace, moto, service);"
            " on AWS that part is the Auto Scaling group's launch time",
            "heal_latency_by_strategy_s": "each strategy's heals in its own set of runs, alternating AZs;"
            " heal_latency_s is the default strategy's (policy-route), measured first",
        },
    }
    print(json.dumps(report, indent=2))
    return 0


def _handover_report(
    views: list[handover.ClientView], description: str, runs: int, *, figures_only: bool = False
) -> dict[str, Any]:
    """The handover figures; alone (`--only handover`) with what was run and the target."""
    gap = summary([v.gap_seconds for v in views])
    figures = {
        "handover_gap_s": gap,
        "handover_switch_s": summary([v.switch_seconds for v in views]),
        "handover_unanswered_polls": [v.unanswered for v in views],
    }
    if figures_only:
        return figures
    return {
        "payload": description,
        "runs": runs,
        **figures,
        "target": {"handover_gap_s": TARGETS["handover_gap_s"]},
        "met": {"handover_gap_s": gap["median"] <= TARGETS["handover_gap_s"]},
        "notes": {
            "handover_gap_s": "time without an answer beyond the 50 ms poll cadence while the address "
            "moves once (0: no poll went unanswered)",
            "handover_switch_s": "from the last poll the old instance answered to the first the new one did",
        },
    }


if __name__ == "__main__":
    sys.exit(main())
