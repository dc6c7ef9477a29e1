"""Without root, the namespace tests skip and say how to run them (instead of failing or passing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests import netns

ROOT = Path(__file__).resolve().parents[2]

# pytest in a child whose os.geteuid() answers as an ordinary user would; nothing is built.
AS_A_USER = """
import os, sys
os.geteuid = lambda: 1000
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_namespace_tests_skip_without_root_with_how_to_run_them() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            AS_A_USER,
            "tests/kernel",
            "tests/lab/test_scenarios.py",
            # Its fake half needs no root (see the test below).
            "--ignore=tests/kernel/test_contract_netlink.py",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert " skipped" in summary and "passed" not in summary and "failed" not in summary, summary
    assert netns.HOW_TO_RUN in done.stdout


def test_the_netlink_contract_runs_its_fake_half_without_root_and_skips_the_kernel_half() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            AS_A_USER,
            "tests/kernel/test_contract_netlink.py",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and " skipped" in summary and "failed" not in summary, summary
    passed, skipped = (int(summary.split(f" {word}")[0].split()[-1]) for word in ("passed", "skipped"))
    # Every case the kernel half skips, the fake half ran (plus the fake's own failure switch).
    assert passed > skipped > 0, summary
    assert netns.HOW_TO_RUN in done.stdout
