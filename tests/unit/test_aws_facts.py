"""docs/aws-facts.md stays checkable: every row a test names exists, ids are unique, and small facts
that no other test pins are pinned here."""

from __future__ import annotations

import re
from pathlib import Path

from bootstrap.imds import TOKEN_TTL_SECONDS
from tests.unit.cdk_app import REPO

FACTS = REPO / "docs" / "aws-facts.md"
# `aws-facts: id` or `aws-facts: id, other-id` in a test's docstring or comment.
_NAMED = re.compile(r"aws-facts: ((?:[a-z0-9]+(?:-[a-z0-9]+)+)(?:, *[a-z0-9]+(?:-[a-z0-9]+)+)*)")


def row_ids() -> list[str]:
    """The id cell of every table row (the header and separator rows left out)."""
    ids = []
    for line in FACTS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and cells[0] not in ("id", "---"):
            ids.append(cells[0].strip("`"))
    return ids


def named_in_tests() -> dict[str, list[str]]:
    """Each id a test names, with the files that name it."""
    named: dict[str, list[str]] = {}
    for path in sorted((REPO / "tests").rglob("*.py")):
        if path.name == Path(__file__).name:
            continue
        for match in _NAMED.finditer(path.read_text()):
            for fact in re.split(r", *", match.group(1)):
                named.setdefault(fact, []).append(str(path.relative_to(REPO)))
    return named


def test_every_row_a_test_names_is_in_the_document() -> None:
    # A test that cites a row nobody wrote cites nothing: the behaviour it encodes has no source.
    rows = set(row_ids())
    missing = {fact: files for fact, files in named_in_tests().items() if fact not in rows}
    assert not missing, missing


def test_row_ids_are_unique() -> None:
    ids = row_ids()
    assert ids, "no rows in docs/aws-facts.md"
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_the_imds_token_ttl_is_within_imdsv2s_bounds() -> None:
    # aws-facts: facts-imds-token
    # IMDSv2 accepts a token TTL from 1 s to 21,600 s; outside it the PUT is refused and no metadata
    # (identity, credentials) can be read at all.
    assert 1 <= TOKEN_TTL_SECONDS <= 21_600
