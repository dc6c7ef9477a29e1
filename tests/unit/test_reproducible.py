"""Two `cdk synth` runs of unchanged sources write byte-identical templates and assets (docs/ci.md).

A pipeline synthesizes once and deploys that assembly; a second synth (a retry, another runner, a
reviewer's `cdk diff`) must give the same templates and the same asset hashes, or the deploy would
publish a new payload and replace every instance for nothing. Slow: two synths through the CDK CLI, the
second from a copy of the sources with a cold payload cache (2 min 37 s on a busy two-core machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.cdk_app import REPO

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def cdk_synth(app_dir: Path, outdir: Path) -> None:
    """`cdk synth` as CI runs it: the pinned CLI, no prompts, no notices, into `outdir`."""
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "CDK_DISABLE_CLI_TELEMETRY": "true",
        "JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION": "1",
    }
    result = subprocess.run(
        [str(VENV_BIN / "cdk"), "synth", "--quiet", "--no-notices", "--output", str(outdir)],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def copy_of_the_sources(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked and new, not ignored): no build/, no cache."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def assembly_files(outdir: Path) -> dict[str, bytes]:
    """What a deploy reads: every template, asset manifest and asset, and the assembly manifest."""
    files = [*outdir.glob("*.template.json"), *outdir.glob("*.assets.json"), *outdir.glob("asset.*")]
    files.append(outdir / "manifest.json")
    return {path.name: path.read_bytes() for path in sorted(files)}


def test_two_synths_of_unchanged_sources_are_byte_identical(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    cdk_synth(REPO, first)
    source = copy_of_the_sources(tmp_path / "src")
    assert not (source / "build").exists(), "the second synth builds the payload bundle from nothing"
    cdk_synth(source, second)
    one, two = assembly_files(first), assembly_files(second)
    assert sorted(one) == sorted(two), "the same templates and the same asset names (hashes)"
    assert any(name.startswith("asset.") for name in one)
    different = [name for name in one if one[name] != two[name]]
    assert different == []
