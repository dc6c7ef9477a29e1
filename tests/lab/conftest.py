"""Fixtures of the VPC lab: one lab per session (built in seconds), reset before every scenario."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab import vpc


@pytest.fixture(scope="session")
def built_lab() -> Iterator[vpc.Lab]:
    with vpc.build() as lab:
        yield lab


@pytest.fixture
def lab(built_lab: vpc.Lab, request: pytest.FixtureRequest) -> Iterator[vpc.Lab]:
    """The lab with the Elastic IP allocated and unassociated, nothing booted, no faults switched on."""
    built_lab.reset()
    yield built_lab
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        # What happened, in order, and what each payload said: the first things to read on a failure.
        for event in built_lab.timeline:
            print(event)
        for instance in built_lab.instances:
            for number, run in enumerate(instance.runs):
                print(f"--- payload run {number} on {instance.instance_id} -> {run.returncode}\n{run.stderr}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)
