"""The payload as the units run it: a non-root uid with only CAP_NET_ADMIN, in systemd-like confinement.

Each run starts, inside the instance namespace, in a private mount namespace that gets a fresh /proc as
`ProtectProc=invisible` + `ProcSubset=pid` give it; then `setpriv` drops to an unused numeric uid/gid (no
passwd entry, as a dynamic user has none here either) with CAP_NET_ADMIN as its only capability (bounding,
inheritable and ambient sets, no-new-privileges), and `confine.py` loads the units' own system-call
allow-list, `MemoryDenyWriteExecute=` and `RestrictAddressFamilies=` as seccomp filters before it execs
the payload. The state directory is the uid's own (0700, as `RuntimeDirectory=` makes it); the
configuration is the uid's own 0400 file (as `LoadCredential=` hands it over).
"""

from __future__ import annotations

import ctypes.util
import errno
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.conftest import both_payloads
from tests.kernel.world import World

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "eip-reclaim.service"
CONFINE = Path(__file__).resolve().with_name("confine.py")
CAP_NET_ADMIN = 12
# Numeric identities with no passwd entry: from the dynamic-user range systemd allocates from (61184-65519).
FIRST_UID = 64400


def unit_values(key: str) -> list[str]:
    """Every value of ``key`` in the boot unit (all of them [Service] keys), in order."""
    found = []
    for raw in UNIT.read_text().splitlines():
        name, sep, value = raw.strip().partition("=")
        if sep and name == key:
            found.append(value.strip())
    return found


def syscall_groups() -> dict[str, list[str]]:
    """systemd-analyze's own table of @groups (this machine's systemd 252), members as listed."""
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
        elif not line.strip():
            current = None
    return groups


def allowed_syscalls() -> set[str]:
    """The unit's SystemCallFilter= lines as systemd reads them: allow-list (and @default), then removals."""
    groups = syscall_groups()

    def expand(item: str) -> set[str]:
        if not item.startswith("@"):
            return {item}
        return set().union(*(expand(member) for member in groups[item]))

    lines = unit_values("SystemCallFilter")
    assert lines and not lines[0].startswith("~"), "expected an allow-list first"
    allowed = expand("@default")
    for value in lines:
        names = set().union(*(expand(i) for i in value.lstrip("~").split()))
        allowed = allowed - names if value.startswith("~") else allowed | names
    return allowed


def allowed_families() -> list[int]:
    names = " ".join(unit_values("RestrictAddressFamilies")).split()
    return sorted(int(getattr(socket, name)) for name in names)


def free_uid() -> int:
    for uid in range(FIRST_UID, FIRST_UID + 100):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if not any(_owner(p) == uid for p in Path("/proc").iterdir() if p.name.isdigit()):
                return uid
    raise AssertionError("no free uid")


def _owner(proc: Path) -> int | None:
    try:
        return proc.stat().st_uid
    except OSError:
        return None


def blocked_ancestor(path: Path) -> tuple[Path, str] | None:
    """The first directory on ``path`` that others cannot search (e.g. /root), and the entry below it."""
    current = Path("/")
    for part in path.parts[1:]:
        if not current.stat().st_mode & stat.S_IXOTH:
            return current, part
        current = current / part
    return None


class Sandbox:
    """A uid, its area (state directory, configuration, a readable copy of a bundle) and the argv prefix."""

    def __init__(self, w: World, area: Path, uid: int) -> None:
        self.w = w
        self.area = area
        self.uid = uid
        self.state = area / "state"
        self.state.mkdir(mode=0o700)
        os.chown(self.state, uid, uid)
        syscalls = area / "syscalls"
        syscalls.write_text("\n".join(sorted(allowed_syscalls())) + "\n")
        self.syscalls = syscalls
        # World's helpers (env, journal, kill_mid_detour) all follow tmp: point it at the uid's area.
        w.tmp = area
        if w.payload_path:
            copy = area / "bundle"
            shutil.copytree(w.payload_path, copy)
            for path in (copy, *copy.rglob("*")):
                path.chmod(0o755 if path.is_dir() else 0o644)
            w.payload_path = str(copy)
        self.payload = list(w.payload_argv)
        w.payload_argv = self.wrap(self.payload)

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` as the units would run it: fresh /proc, the uid, the capability, the seccomp filters."""
        interpreter = argv[0]
        setup = [
            "set -e",
            "mount -t proc -o nosuid,nodev,noexec,hidepid=invisible,subset=pid proc /proc",
        ]
        # An interpreter installed under a home that others cannot search (pyenv under /root): in this
        # mount namespace only, a tmpfs over that home with just the interpreter's tree bound back in.
        exposed: dict[Path, set[str]] = {}
        for path in {Path(interpreter), Path(interpreter).resolve(), Path(sys.base_prefix)}:
            found = blocked_ancestor(path)
            if found:
                exposed.setdefault(found[0], set()).add(found[1])
        for n, (home, entries) in enumerate(sorted(exposed.items())):
            stages = []
            for m, entry in enumerate(sorted(entries)):
                stage = self.area / f"stage-{n}-{m}"
                stage.mkdir(exist_ok=True)
                setup.append(f"mount --bind '{home / entry}' '{stage}'")
                stages.append((stage, entry))
            setup.append(f"mount -t tmpfs -o mode=0755,size=1m tmpfs '{home}'")
            for stage, entry in stages:
                setup += [f"mkdir '{home / entry}'", f"mount --move '{stage}' '{home / entry}'"]
        setup.append('exec "$@"')
        setpriv = [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.uid}",
            "--clear-groups",
            "--nnp",
            "--inh-caps=-all,+net_admin",
            "--ambient-caps=-all,+net_admin",
            "--bounding-set=-all,+net_admin",
        ]
        families = ",".join(map(str, allowed_families()))
        confine = [interpreter, "-S", str(CONFINE), f"--syscalls={self.syscalls}", f"--families={families}"]
        shell = ["sh", "-c", "\n".join(setup), "sh"]
        unshare = ["unshare", "--mount", "--propagation=private", "--"]
        return [*unshare, *shell, *setpriv, "--", *confine, "--", *argv]

    def config(self, **overrides: Any) -> Path:
        """The configuration as LoadCredential= hands it over: the service user's own, read-only."""
        path = self.w.config(**overrides)
        os.chown(path, self.uid, self.uid)
        path.chmod(0o400)
        return path


@pytest.fixture
def box(w: World) -> Iterator[Sandbox]:
    if not ctypes.util.find_library("seccomp"):
        pytest.skip("no libseccomp (confine.py loads the units' filters): apt-get install libseccomp2")
    area = Path(tempfile.mkdtemp(prefix="eipr-unprivileged-"))
    try:
        area.chmod(0o755)
        yield Sandbox(w, area, free_uid())
    finally:
        shutil.rmtree(area, ignore_errors=True)


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


@both_payloads
def test_confinement_bites(w: World, box: Sandbox) -> None:
    """The harness itself: a probe under the same prefix sees what the payload will see."""
    probe = (
        "import ctypes, json, mmap, os, socket\n"
        "r = {}\n"
        "def tryit(name, f):\n"
        "    try:\n"
        "        f(); r[name] = 'ok'\n"
        "    except OSError as e:\n"
        "        r[name] = e.errno\n"
        "tryit('wx', lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))\n"
        "tryit('packet', lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))\n"
        "tryit('netlink', lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close())\n"
        "tryit('setpriority', lambda: os.setpriority(os.PRIO_PROCESS, 0, 5))\n"
        "tryit('chown', lambda: os.chown('/', -1, -1))\n"
        "tryit('ctypes', lambda: ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 0)())\n"
        "tryit('psched', lambda: open('/proc/net/psched').close())\n"
        "tryit('tls', lambda: __import__('ssl').create_default_context())\n"
        "r['proc'] = sorted(p for p in os.listdir('/proc') if not p.isdigit())\n"
        "r['owners'] = sorted({os.stat('/proc/' + p).st_uid for p in os.listdir('/proc') if p.isdigit()})\n"
        "r['uid'] = os.getuid()\n"
        "r['status'] = {l.split(':')[0]: l.split(':')[1].strip() for l in open('/proc/self/status')}\n"
        "print(json.dumps(r))\n"
    )
    done = w.inst.run(*box.wrap([box.payload[0], "-S", "-c", probe]), timeout=60)
    seen = json.loads(done.stdout)
    assert seen["uid"] == box.uid
    # Only CAP_NET_ADMIN, in every set that matters; no way to gain more.
    want = f"{1 << CAP_NET_ADMIN:016x}"
    for key in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
        assert seen["status"][key] == want, (key, seen["status"])
    assert seen["status"]["NoNewPrivs"] == "1"
    assert seen["status"]["Seccomp"] == "2"
    # MemoryDenyWriteExecute=, SystemCallFilter= (~@privileged ~@resources), RestrictAddressFamilies=.
    assert seen["wx"] == errno.EPERM
    assert seen["setpriority"] == errno.EPERM
    assert seen["chown"] == errno.EPERM
    assert seen["packet"] == errno.EAFNOSUPPORT
    assert seen["netlink"] == "ok"
    # pyroute2 reads /proc/net/psched at import (for tc only, which the payload never uses; it logs to a
    # NullHandler and carries on); botocore's TLS context loads under the filters.
    assert seen["psched"] == errno.ENOENT
    assert seen["tls"] == "ok"
    # No ctypes callback is on the payload's path; this host's libffi makes one without W+X memory anyway.
    print(f"ctypes callback under the filters: {seen['ctypes']}")
    # ProtectProc=invisible: no other uid's process; ProcSubset=pid: no /proc/net, /proc/sys, /proc/meminfo.
    assert seen["owners"] == [box.uid]
    assert {"net", "sys", "meminfo", "uptime"}.isdisjoint(seen["proc"]), seen["proc"]


@both_payloads
def test_success_as_the_unprivileged_user(w: World, box: Sandbox) -> None:
    before = w.all_routes()
    w.pause_api()
    proc = w.start_payload(box.config())
    try:
        w.wait_for_detour()
        # The process that changed the routes is the uid with CAP_NET_ADMIN only, under seccomp.
        seen = status(proc.pid)
        assert seen["Uid"].split()[:2] == [str(box.uid)] * 2
        assert seen["CapEff"] == f"{1 << CAP_NET_ADMIN:016x}"
        assert seen["Seccomp"] == "2"
        # Its journal is its own, in its own directory.
        assert w.journal.stat().st_uid == box.uid
    finally:
        w.resume_api()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert w.all_routes() == before
    assert w.holder() == w.ids["self"]
    assert not w.journal.exists()
    # Nothing on the payload's path wanted what the sandbox withholds (pyroute2 warns when /proc/net is
    # missing; a refused system call or W+X mapping would surface as an error or a traceback).
    assert "WARNING" not in err and "Traceback" not in err, err


@both_payloads
def test_sigterm_mid_detour_as_the_unprivileged_user(w: World, box: Sandbox) -> None:
    before = w.all_routes()
    code, err = w.stop_mid_detour(box.config())
    assert code == 75, err
    assert "SIGTERM" in err
    assert w.all_routes() == before
    assert not w.journal.exists()


@both_payloads
def test_sigkill_then_a_rerun_as_the_unprivileged_user(w: World, box: Sandbox) -> None:
    before = w.all_routes()
    w.kill_mid_detour(box.config())
    assert w.all_routes() != before
    assert w.journal.exists()
    code, _, err = w.run_payload(box.config())
    assert code == 0, err
    assert "recover:" in err
    assert w.all_routes() == before
    assert w.holder() == w.ids["self"]
    assert not w.journal.exists()
