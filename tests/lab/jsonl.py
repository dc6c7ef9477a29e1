"""Append-only JSON-lines logs that the lab's processes write and the tests read back."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

_lock = threading.Lock()


def append(path: Path, record: dict[str, Any]) -> None:
    """One line per event; `t` (now, unless the record has its own) is CLOCK_MONOTONIC, which every
    namespace shares, so the logs of all the lab's processes interleave."""
    line = json.dumps({"t": time.monotonic(), **record}) + "\n"
    with _lock, path.open("a") as out:
        out.write(line)


def read(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    # A writer may be mid-line; only complete lines count.
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]
