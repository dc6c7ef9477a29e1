"""Fixtures of the kernel tests: a fresh subnet per test, running this checkout or the shipped bundle."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel import bundled as shipped
from tests.kernel import world as lab
from tests.kernel.world import World, world

# The payload as the tests start it by default: this checkout under the test interpreter, unless the
# environment points every test at another interpreter and bundle (world.py).
DEFAULT = "env" if os.environ.get(lab.PAYLOAD_PYTHON_ENV) else "checkout"
# The shipped bundle under Amazon Linux 2023's interpreter, started as the systemd unit starts it.
BUNDLE = "bundle-py39"
# The key scenarios run with both; the rest with the default only, to keep the run short.
both_payloads = pytest.mark.parametrize("w", [DEFAULT, BUNDLE], indirect=True)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> shipped.Bundled:
    """Built once (cached in build/), unpacked and byte-compiled once per session."""
    python = shipped.find_python39()
    if python is None:
        pytest.skip(shipped.INSTALL_HINT)
    return shipped.unpack(python, tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def w(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    payload = getattr(request, "param", DEFAULT)
    chosen = request.getfixturevalue("bundle") if payload == BUNDLE else None
    with world(tmp_path) as built:
        if chosen is not None:
            built.payload_argv = chosen.argv
            built.payload_path = str(chosen.path)
        yield built
