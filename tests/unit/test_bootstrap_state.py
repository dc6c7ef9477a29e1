"""The journal (atomic, recoverable) and the lock (one run at a time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bootstrap.errors import LockBusy, TransientError
from bootstrap.state import DEFAULT_STATE_DIR, Journal, Lock, StateError, state_dir
from tests.unit.test_bootstrap_fakes import FakeClock


def test_state_dir_comes_from_the_environment() -> None:
    assert state_dir({}) == DEFAULT_STATE_DIR == "/run/eip-reclaim"
    assert state_dir({"EIP_RECLAIM_STATE_DIR": "/tmp/x"}) == "/tmp/x"


def test_journal_round_trip_and_delete(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "state"))
    assert journal.read() is None
    journal.write({"plan": {"nat": "10.0.0.4"}})
    assert journal.read() == {"version": 1, "plan": {"nat": "10.0.0.4"}}
    assert oct(os.stat(journal.path).st_mode & 0o777) == "0o600"
    journal.delete()
    assert journal.read() is None
    journal.delete()  # idempotent


def test_a_write_that_dies_before_the_rename_leaves_the_old_journal_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(str(tmp_path))
    journal.write({"plan": {"nat": "old"}})

    def crash(src: str, dst: str) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StateError, match="power cut"):
        journal.write({"plan": {"nat": "new"}})
    monkeypatch.undo()
    assert journal.read() == {"version": 1, "plan": {"nat": "old"}}


def test_the_journal_is_written_by_rename_never_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(str(tmp_path))
    renames: list[tuple[str, str]] = []
    real = os.replace

    def spy(src: str, dst: str) -> None:
        # At the moment of the rename the temporary file is complete and the target is untouched.
        assert Path(src).read_text().startswith("{")
        renames.append((src, dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    journal.write({"plan": 1})
    assert renames and renames[0][1] == journal.path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routes.json"]


@pytest.mark.parametrize(
    "content", ["{not json", '{"version": 99}', "[]", '{"version": 1}', '{"version": 1, "plan": [1]}']
)
def test_a_corrupt_journal_is_an_error_not_silence(tmp_path: Path, content: str) -> None:
    (tmp_path / "routes.json").write_text(content)
    with pytest.raises(TransientError, match="inspect and remove it") as caught:
        Journal(str(tmp_path)).read()
    assert str(tmp_path / "routes.json") in str(caught.value)
    assert (tmp_path / "routes.json").exists()  # kept for an operator


def test_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    lock = Lock(str(tmp_path), FakeClock())
    lock.acquire()
    try:
        # Another process (as a second run would be) cannot take it.
        code = subprocess.run(
            [
                sys.executable,
                "-c",
                "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR)\n"
                "try: fcntl.flock(fd, fcntl.LOCK_EX|fcntl.LOCK_NB)\nexcept OSError: sys.exit(9)",
                lock.path,
            ],
            check=False,
        ).returncode
        assert code == 9
    finally:
        lock.release()


def test_second_lock_waits_briefly_then_fails_with_75(tmp_path: Path) -> None:
    first = Lock(str(tmp_path), FakeClock())
    first.acquire()
    clock = FakeClock()
    second = Lock(str(tmp_path), clock)
    with pytest.raises(LockBusy) as caught:
        second.acquire()
    assert caught.value.exit_code == 75
    assert 2.0 <= sum(clock.slept) < 2.2
    first.release()
    second.acquire()
    second.release()
