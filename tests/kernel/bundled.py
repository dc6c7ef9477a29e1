"""The shipped bundle, unpacked and byte-compiled as the user data installs it, for Python 3.9."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stacks.bundle import MANIFEST_NAME, build_bundle

# Amazon Linux 2023's system python3.
INSTANCE_PYTHON = (3, 9)
PYENV_PYTHONS = "~/.pyenv/versions/3.9*/bin/python3.9"
INSTALL_HINT = (
    "no working CPython 3.9 (Amazon Linux 2023's python3) for the shipped bundle: install one, "
    "e.g. `pyenv install 3.9`, so that `python3.9` is on PATH or under ~/.pyenv/versions/"
)

# What the payload's process sees of itself, printed as JSON by the interpreter and flags that start it.
PROBE = """
import json, sys
import botocore, bootstrap, urllib3
from bootstrap.iproute import iproute_class
iproute_class()  # as the payload loads pyroute2: past its __init__ (the bundle prunes what that imports)
import pyroute2
print(json.dumps({
    "implementation": sys.implementation.name,
    "version": list(sys.version_info[:3]),
    "no_site": sys.flags.no_site,
    "site_imported": "site" in sys.modules,
    "path": sys.path,
    "modules": {m.__name__: [m.__file__, getattr(m, "__version__", None)]
                for m in (botocore, bootstrap, pyroute2, urllib3)},
}))
"""


def find_python39() -> str | None:
    """The real executable of a working CPython 3.9: `python3.9` on PATH, else pyenv's; None if neither runs.

    Each candidate is run: a pyenv shim is on PATH even where 3.9 is not a selected pyenv version, and then
    it fails. The resolved executable also spares every payload start the shim's bash and `pyenv exec`.
    """
    candidates = [shutil.which("python3.9"), *sorted(glob.glob(os.path.expanduser(PYENV_PYTHONS)))]
    ask = "import sys; print(sys.implementation.name, *sys.version_info[:2]); print(sys.executable)"
    for candidate in filter(None, candidates):
        try:
            done = subprocess.run(
                [candidate, "-S", "-c", ask], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = done.stdout.splitlines()
        if done.returncode == 0 and len(lines) == 2 and lines[0] == "cpython 3 9":
            return lines[1]
    return None


@dataclass(frozen=True)
class Bundled:
    """An unpacked bundle and the interpreter that runs it."""

    python: str
    path: Path
    manifest: dict[str, Any]

    @property
    def argv(self) -> list[str]:
        """As the systemd unit starts it: `python3 -S -m bootstrap`, with the bundle on PYTHONPATH."""
        return [self.python, "-S", "-m", "bootstrap"]

    def probe(self) -> dict[str, Any]:
        """Run PROBE with the interpreter, flags, PYTHONPATH and directory the payload runs with."""
        done = subprocess.run(
            [self.python, "-S", "-c", PROBE],
            cwd=self.path,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(self.path)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        result: dict[str, Any] = json.loads(done.stdout)
        return result


def unpack(python: str, dest: Path) -> Bundled:
    """Build (or find in build/) the bundle, unzip it into ``dest`` and byte-compile it with ``python``."""
    info = build_bundle(log=sys.stderr)
    with zipfile.ZipFile(info.path) as archive:
        archive.extractall(dest)
    # As the user data installs it: byte-compiled by the instance's interpreter. Without the .pyc files
    # every run would compile the sources again (about 0.5 s a run, docs/payload.md, Speed).
    subprocess.run(
        [python, "-S", "-m", "compileall", "-q", "-j", "0", str(dest)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    manifest: dict[str, Any] = json.loads((dest / MANIFEST_NAME).read_text())
    return Bundled(python=python, path=dest, manifest=manifest)
