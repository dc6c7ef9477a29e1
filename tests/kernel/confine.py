"""Apply what only systemd enforces on the units' payload, then exec it: a stand-in for systemd 252's seccomp.

    python -S confine.py --syscalls FILE --families N,N,... -- PROGRAM ARG...

Three seccomp filters, as systemd loads them for the units (src/shared/seccomp-util.c):
- SystemCallFilter=: the allow-list in FILE (one name a line, already expanded); anything else EPERM
  (SystemCallErrorNumber=EPERM), native architecture only (SystemCallArchitectures=native);
- MemoryDenyWriteExecute=yes: mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect with PROT_EXEC, and
  shmat with SHM_EXEC fail with EPERM;
- RestrictAddressFamilies=: socket() of any other family fails with EAFNOSUPPORT.

Runs under the payload's own interpreter (Python 3.9 for the bundle), as the payload's user, after setpriv.
ctypes here is the wrapper's, loaded before the filters; the exec leaves it behind.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import os
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_GE = 5
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE = 0x2
PROT_EXEC = 0x4
SHM_EXEC = 0o100000
# Above every family number the kernel knows (AF_MAX is 46 on 6.x).
FAMILY_LIMIT = 64


def scmp_act_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class Seccomp:
    def __init__(self) -> None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        self.lib = ctypes.CDLL(name, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(ArgCmp),
        ]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_release.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    def number(self, name: str) -> int:
        return int(self.lib.seccomp_syscall_resolve_name(name.encode()))

    def load(self, default: int, rules: list[tuple]) -> None:
        """One filter: ``rules`` are (action, syscall number, [(arg, op, a, b), ...])."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        try:
            for action, number, conditions in rules:
                array = (ArgCmp * max(1, len(conditions)))(*[ArgCmp(*c) for c in conditions])
                rc = self.lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array)
                if rc < 0:
                    raise OSError(-rc, f"seccomp_rule_add_array({number}): {os.strerror(-rc)}")
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
        finally:
            self.lib.seccomp_release(ctx)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--syscalls", required=True, help="allowed system calls, one name a line")
    parser.add_argument("--families", required=True, help="allowed socket families, comma-separated")
    parser.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    seccomp = Seccomp()

    with open(args.syscalls, encoding="utf-8") as handle:
        names = [line.strip() for line in handle if line.strip()]
    deny = scmp_act_errno(errno.EPERM)
    wx = PROT_WRITE | PROT_EXEC
    seccomp.load(
        SCMP_ACT_ALLOW,
        [
            (deny, seccomp.number("mmap"), [(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
            (deny, seccomp.number("mprotect"), [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (deny, seccomp.number("pkey_mprotect"), [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (deny, seccomp.number("shmat"), [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
        ],
    )

    families = {int(f) for f in args.families.split(",")}
    unsupported = scmp_act_errno(errno.EAFNOSUPPORT)
    socket = seccomp.number("socket")
    rules: list[tuple] = [
        (unsupported, socket, [(0, SCMP_CMP_EQ, family, 0)])
        for family in range(FAMILY_LIMIT)
        if family not in families
    ]
    rules.append((unsupported, socket, [(0, SCMP_CMP_GE, FAMILY_LIMIT, 0)]))
    seccomp.load(SCMP_ACT_ALLOW, rules)

    # Names this architecture lacks (32-bit-only calls, say) resolve negative: skipped, as systemd does.
    allowed = sorted({n for n in map(seccomp.number, names) if n >= 0})
    # Last: it refuses seccomp() itself, as the other filters were loaded before it.
    seccomp.load(scmp_act_errno(errno.EPERM), [(SCMP_ACT_ALLOW, n, []) for n in allowed])

    os.execv(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
