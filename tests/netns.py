"""Throwaway network namespaces for tests: unique names, processes killed, always removed."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

# Every namespace this test run makes starts with this; the pid keeps parallel runs apart and lets a
# later run recognise (and remove) what a killed run left behind.
PREFIX = "eipr-"
RUN_PREFIX = f"{PREFIX}{os.getpid()}-"
_counter = itertools.count()

HOW_TO_RUN = "needs root and `ip netns`: run `sudo make test` (CI runs it as root)"


def can_run() -> bool:
    """True where namespaces can be made: root, with iproute2 installed."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def sh(*cmd: str, check: bool = True, timeout: float = 30, input: str | None = None) -> str:
    """Run a command in the caller's namespace; raise with its stderr on failure."""
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, input=input)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class Netns:
    """One namespace; `run` and `popen` execute inside it. Processes it started die with it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._procs: list[subprocess.Popen[bytes]] = []

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(cmd), check=False, capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"[{self.name}] {' '.join(cmd)} -> {done.returncode}: {done.stderr.strip()}")
        return done

    def popen(self, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.argv(cmd), **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def ip(self, *args: str) -> str:
        return self.run("ip", *args).stdout

    def kill_all(self) -> None:
        """Kill what this namespace runs: our own children first, then anything `ip netns pids` still sees."""
        for proc in self._procs:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        pids = sh("ip", "netns", "pids", self.name, check=False).split()
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _new_name(tag: str) -> str:
    return f"{RUN_PREFIX}{tag}-{next(_counter)}"


def delete(name: str) -> None:
    ns = Netns(name)
    ns.kill_all()
    for _ in range(50):
        if subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True).returncode == 0:
            return
        if name not in list_namespaces():
            return
        time.sleep(0.1)
    raise RuntimeError(f"namespace {name} could not be deleted")


@contextmanager
def netns(tag: str) -> Iterator[Netns]:
    """A fresh namespace with loopback up; deleted (after killing its processes) however the block ends."""
    name = _new_name(tag)
    sh("ip", "netns", "add", name)
    ns = Netns(name)
    try:
        ns.ip("link", "set", "lo", "up")
        yield ns
    finally:
        ns.kill_all()
        delete(name)


def list_namespaces() -> list[str]:
    root = Path("/run/netns")
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def ours_left() -> list[str]:
    """Namespaces this run made that still exist (a leak)."""
    return [n for n in list_namespaces() if n.startswith(RUN_PREFIX)]


def remove_stale() -> list[str]:
    """Delete namespaces left by earlier runs whose process is gone; return their names."""
    removed = []
    for name in list_namespaces():
        if not name.startswith(PREFIX) or name.startswith(RUN_PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            delete(name)
            removed.append(name)
    return removed
