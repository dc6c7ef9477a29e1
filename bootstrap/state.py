"""The state directory: the route journal (atomic writes) and the one-run-at-a-time lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterable
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
TEMP_SUFFIX = ".tmp"
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
        """Replace the journal; a full or read-only state directory is one line and exit 75."""
        data = json.dumps({"version": JOURNAL_VERSION, **document}, indent=1, sort_keys=True)
        try:
            write_atomically(self.directory, self.path, data.encode("utf-8"))
        except OSError as err:
            raise StateError(
                f"journal: cannot write {self.path}: {err.strerror or err} (the state directory "
                f"${STATE_DIR_ENV} must be a writable tmpfs such as /run); no route changed by this write"
            ) from None

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
        if not isinstance(document.get("plan", document.get("policy")), dict):
            # The right version but not what this payload writes: kept for an operator, never guessed at.
            raise TransientError(f"journal: {self.path}: no 'plan' or 'policy' object; inspect and remove it")
        return document

    def delete(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        _sync_directory(self.directory)


class StateError(TransientError):
    """The state directory cannot be written (full, read-only)."""


def write_atomically(directory: str, path: str, data: bytes) -> None:
    """Temp file, every byte written (a short write is continued), fsync, rename, fsync of the directory."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temp = temporary_name(path, os.getpid())
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.ENOSPC, "no byte written")
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, path)
    _sync_directory(directory)


def temporary_name(path: str, pid: int) -> str:
    """The temporary file `write_atomically` writes `path` through: `<path>.<pid>.tmp`."""
    return f"{path}.{pid}{TEMP_SUFFIX}"


def remove_stray_temporaries(directory: str, own: Iterable[str]) -> list[str]:
    """Delete the temporary files of the files named `own` that a killed run left.

    Only those: the caller holds the lock, so none of them is being written, but the watchdog writes its
    own files through temporary files in the same directory without the lock, and another process's
    file is never this run's to remove.
    """
    pattern = re.compile(f"(?:{'|'.join(re.escape(name) for name in own)})\\.[0-9]+{re.escape(TEMP_SUFFIX)}")
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if pattern.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                removed.append(name)
    return removed


def _sync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Marks:
    """Small records that something is done for an instance (a file holding its id), kept in /run.

    A reboot clears /run, and with it the marks: the next boot asks again, and is told nothing waits.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    @staticmethod
    def file_name(name: str) -> str:
        return f"{name}.done"

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, self.file_name(name))

    def done(self, name: str, instance_id: str) -> bool:
        try:
            with open(self._path(name), encoding="utf-8") as handle:
                return handle.read().strip() == instance_id
        except OSError:
            return False

    def mark(self, name: str, instance_id: str) -> None:
        """Record it; a failure costs only a repeated call on a later run, so it is logged, not raised."""
        try:
            write_atomically(self.directory, self._path(name), instance_id.encode("ascii"))
        except OSError as err:
            LOG.warning("state: cannot record %s as done in %s: %s", name, self.directory, err)


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
