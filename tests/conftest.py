"""Test-wide setup: skip the root-only tests with how to run them, and check no namespace leaks."""

from __future__ import annotations

import pytest

from tests import netns


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if netns.can_run():
        return
    skip = pytest.mark.skip(reason=netns.HOW_TO_RUN)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _namespace_hygiene() -> object:
    """Remove what killed earlier runs left; fail the session if this run leaks a namespace."""
    if netns.can_run():
        netns.remove_stale()
    yield
    if netns.can_run():
        leaked = netns.ours_left()
        for name in leaked:
            netns.delete(name)
        assert not leaked, f"namespaces leaked by this test run (now removed): {leaked}"
