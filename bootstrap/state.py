"""The state directory: the route journal (atomic writes) and the one-run-at-a-time lock."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from typing import Any, Optional

from bootstrap.clock import Clock
from bootstrap.errors import LockBusy, TransientError

LOG = logging.getLogger(__name__)

STATE_DIR_ENV = "EIP_RECLAIM_STATE_DIR"
# tmpfs: a journal must not survive a reboot, when the kernel's routes are rebuilt from scratch anyway.
DEFAULT_STATE_DIR = "/run/eip-reclaim"
JOURNAL_NAME = "routes.json"
LOCK_NAME = "lock"
JOURNAL_VERSION = 1
# A second run started by a timer while the boot run finishes waits this long, then gives up (75:
# systemd or the next timer tick tries again).
LOCK_WAIT_SECONDS = 2.0
LOCK_POLL_SECONDS = 0.05


def state_dir(environ: Optional[dict[str, str]] = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


class Journal:
    """One JSON document, replaced atomically (temp file, fsync, rename, fsync of the directory)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, JOURNAL_NAME)

    def write(self, document: dict[str, Any]) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        temp = f"{self.path}.{os.getpid()}.tmp"
        data = json.dumps({"version": JOURNAL_VERSION, **document}, indent=1, sort_keys=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.path)
        self._sync_directory()

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def read(self) -> Optional[dict[str, Any]]:
        """The journaled document, or None when there is none. A corrupt journal is an error, not None."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                document = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise TransientError(f"journal: {self.path}: unreadable ({err}); inspect and remove it") from None
        if not isinstance(document, dict) or document.get("version") != JOURNAL_VERSION:
            raise TransientError(f"journal: {self.path}: unknown format; inspect and remove it")
        if not isinstance(document.get("plan"), dict):
            # The right version but not what this payload writes: kept for an operator, never guessed at.
            raise TransientError(f"journal: {self.path}: no 'plan' object; inspect and remove it")
        return document

    def delete(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Lock:
    """An exclusive flock on <state dir>/lock, released when the process ends however it ends."""

    def __init__(self, directory: str, clock: Clock) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        self._directory = directory
        self._clock = clock
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        os.makedirs(self._directory, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        give_up = self._clock.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if self._clock.monotonic() >= give_up:
                    os.close(fd)
                    raise LockBusy(
                        f"lock: another eip-reclaim run holds {self.path} (waited {LOCK_WAIT_SECONDS:g} s)"
                    ) from None
                self._clock.sleep(LOCK_POLL_SECONDS)
                continue
            self._fd = fd
            return

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
