"""The wheel, installed alone into a fresh virtual environment, synthesizes a team's app (examples/own-app).

Nothing from this checkout but the wheel reaches that environment: its dependencies come from PyPI (or
pip's cache) at the versions requirements.txt pins, and the app runs from a copy of examples/own-app in
a temporary directory. The payload bundle is built there from the wheel's package data, cdk-nag runs at
synth, cfn-lint afterwards. Slow: a virtual environment, an install, a cold bundle build and a synth (6 min
10 s on a busy two-core machine, downloading aws-cdk-lib and the payload's pins from PyPI each time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from stacks.bundle import build_bundle
from tests.unit.cdk_app import REPO

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def run(
    command: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=1200
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(REPO)])
    (built,) = out.glob("eip_reclaim-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with the wheel and the pinned synth-time dependencies, nothing else."""
    root = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", str(root)])
    pins = REPO / "requirements.txt"
    python = str(root / "bin" / "python")
    run([python, "-m", "pip", "install", "--quiet", "-r", str(pins), "-c", str(pins), str(wheel)])
    return root


def clean_env(venv: Path) -> dict[str, str]:
    """The fresh environment first on PATH; the shared one after it only for node and the CDK CLI."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), str(VENV_BIN), "/usr/bin", "/bin"])
    env["CDK_DISABLE_CLI_TELEMETRY"] = "true"
    env["JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION"] = "1"
    return env


def test_the_wheel_carries_the_payload_its_pins_and_units(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "eip_reclaim/py.typed" in names
    assert "eip_reclaim/_payload/bootstrap/requirements.txt" in names
    payload = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "bootstrap").rglob("*.py"))
    assert {f"eip_reclaim/_payload/{name}" for name in payload} <= names
    units = sorted(p.name for p in (REPO / "deploy" / "systemd").iterdir())
    assert {f"eip_reclaim/_payload/systemd/{unit}" for unit in units} <= names
    # The checkout's one-line shim stays out: installed, eip_reclaim is the package itself.
    assert "eip_reclaim.py" not in names
    print(f"wheel: {wheel.name}, {wheel.stat().st_size} bytes, {len(names)} files")


def test_the_public_names_import_from_the_installed_package(venv: Path, tmp_path: Path) -> None:
    code = (
        "import eip_reclaim, pathlib;"
        "from eip_reclaim import HealingService, StableNatProvider, Egress;"
        "print(eip_reclaim.__version__, pathlib.Path(eip_reclaim.__file__).parent)"
    )
    result = run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=clean_env(venv))
    version, location = result.stdout.split()
    ours = run([sys.executable, "-c", "import eip_reclaim; print(eip_reclaim.__version__)"], cwd=REPO)
    assert version == ours.stdout.strip()
    assert Path(location).is_relative_to(venv), "imported from the environment, not the checkout"


def test_the_example_app_synthesizes_cdk_nag_and_cfn_lint_clean(venv: Path, tmp_path: Path) -> None:
    app = tmp_path / "own-app"
    shutil.copytree(REPO / "examples" / "own-app", app)
    out = tmp_path / "cdk.out"
    synth = [str(VENV_BIN / "cdk"), "synth", "--quiet", "--no-notices", "--output", str(out)]
    run(synth, cwd=app, env=clean_env(venv))
    report = json.loads((out / "validation-report.json").read_text())
    assert [(p["pluginName"], p["conclusion"], p["violations"]) for p in report["pluginReports"]] == [
        ("AwsSolutions", "success", [])
    ]
    templates = sorted(str(p) for p in out.glob("*.template.json"))
    assert templates
    run([str(VENV_BIN / "cfn-lint"), "--format", "parseable", *templates])
    # The bundle was built from the wheel's package data, under the app's directory, byte for byte the
    # one the checkout builds: the same payload, pins and units travelled.
    (built,) = (app / "build" / "eip-reclaim").glob("bundle-*.zip")
    assert built.read_bytes() == build_bundle().path.read_bytes()
