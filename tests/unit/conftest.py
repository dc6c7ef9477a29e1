"""Unit-test-wide setup: no test resolves a real host name."""

from __future__ import annotations

import pytest

from bootstrap import reclaim

# What the fakes' EC2 endpoint resolves to (a documentation address).
API_ADDRESS = "203.0.113.10"


@pytest.fixture(autouse=True)
def _no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path check resolves the EC2 endpoint; the fakes answer for one address instead of DNS."""
    monkeypatch.setattr(reclaim, "_api_address", lambda config: API_ADDRESS)
