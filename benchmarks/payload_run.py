"""Wall time of one successful payload run against moto in a namespace, and its import share; prints JSON.

Each run is the real `python -m bootstrap` in the kernel tests' subnet (tests/kernel/world.py): IMDSv2,
journal, pins, route replace via the NAT, DescribeAddresses / DescribeInstances / AssociateAddress /
verify against moto, restore. Between runs the Elastic IP is given back to the other instance, outside
the timing, so every run does the whole reclaim. Needs root.

- run_wall_s: process start to exit, as the caller sees it;
- run_cpu_s: the CPU time (user + system) of that process: steadier than wall time on a shared machine;
- startup_s: the same interpreter doing nothing (`python -c pass`) in the same namespace;
- imports_s: a fresh interpreter importing the modules a run loads (bootstrap, pyroute2's IPRoute as the
  payload imports it, botocore and its client machinery) and loading the EC2 model, one after another,
  timed inside the interpreter (so without startup_s); the payload overlaps part of it with IMDS and
  route work on a background thread;
- importtime_top: the slowest top-level imports of one run under `python -X importtime`.

    sudo .venv/bin/python -m benchmarks.payload_run --runs 9
    sudo .venv/bin/python -m benchmarks.payload_run --bundle DIR --python /usr/bin/python3.9
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests import netns
from tests.kernel.world import REPO, world

IMPORTS = """
import time; t = time.perf_counter()
import bootstrap.cli, bootstrap.reclaim, bootstrap.claim, bootstrap.aws, bootstrap.iproute
bootstrap.iproute.iproute_class()
import botocore.session, botocore.client, botocore.config
botocore.session.Session().get_service_model("ec2")
print(time.perf_counter() - t)
"""


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "runs": [round(v, 3) for v in values],
    }


def _children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _timed(w: Any, config: Path, *extra: str) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the payload's process, its stderr)."""
    cpu = _children_cpu()
    started = time.perf_counter()
    code, _, err = w.run_payload(config, *extra)
    took = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"payload exited {code}:\n{err}")
    return took, _children_cpu() - cpu, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--bundle",
        metavar="DIR",
        help="run an unpacked, byte-compiled bundle (python -m stacks.bundle) instead of this checkout",
    )
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the payload")
    args = parser.parse_args()
    if not netns.can_run():
        raise SystemExit(netns.HOW_TO_RUN)
    with tempfile.TemporaryDirectory(prefix="eipr-bench-") as tmp, world(Path(tmp)) as w:
        if args.bundle:
            # As the systemd unit starts it: the instance's python3, no site-packages, the bundle on the path.
            w.payload_argv = [args.python, "-S", "-m", "bootstrap"]
            w.payload_path = args.bundle
        else:
            w.payload_argv = [args.python, "-m", "bootstrap"]
        config = w.config()
        walls, cpus, startups, imports = [], [], [], []
        for _ in range(args.runs):
            w.seed("associate", w.ids["allocation_id"], w.ids["other"])
            took, cpu, err = _timed(w, config)
            if "associating" not in err:
                raise SystemExit(f"the run did not reclaim:\n{err}")
            walls.append(took)
            cpus.append(cpu)
            started = time.perf_counter()
            w.inst.run(args.python, "-c", "pass")
            startups.append(time.perf_counter() - started)
            path = args.bundle or str(REPO)
            out = w.inst.run("env", f"PYTHONPATH={path}", args.python, "-c", IMPORTS).stdout
            imports.append(float(out.strip()))
        # One more run under -X importtime (not timed: the profiler slows it down).
        w.seed("associate", w.ids["allocation_id"], w.ids["other"])
        _, _, err = w.run_payload(config, env=w.env(PYTHONPROFILEIMPORTTIME="1"))
        top = [
            line for line in err.splitlines() if line.startswith("import time:") and "cumulative" not in line
        ]
    median_wall = statistics.median(walls)
    median_imports = statistics.median(imports)
    report = {
        "payload": f"{args.bundle or 'checkout'} with {args.python}",
        "runs": args.runs,
        "run_wall_s": _summary(walls),
        "run_cpu_s": _summary(cpus),
        "startup_s": _summary(startups),
        "imports_s": _summary(imports),
        "import_share_of_run": round(median_imports / median_wall, 2),
        "target_run_wall_median_s": 1.0,
        "importtime_top_level": _top_level(top),
    }
    print(json.dumps(report, indent=2))


def _top_level(lines: list[str], n: int = 6) -> list[dict[str, Any]]:
    """The slowest imports that a run made at the top level (no enclosing import)."""
    rows = []
    for line in lines:
        _, cumulative, name = line.split("|")
        if not cumulative.strip().isdigit():
            continue  # the header line
        if name.startswith("   "):
            continue  # nested under another import
        rows.append({"module": name.strip(), "cumulative_ms": round(int(cumulative) / 1000, 1)})
    return sorted(rows, key=lambda r: -r["cumulative_ms"])[:n]


if __name__ == "__main__":
    main()
