"""Domain exceptions; each carries the process exit code documented in the design."""

from __future__ import annotations

# Exit codes of the contract (systemd restarts only on EX_TEMPFAIL).
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_PERMANENT = 3
EXIT_TEMPFAIL = 75


class ReclaimError(Exception):
    """A failure that ends the run with `exit_code`."""

    exit_code = EXIT_TEMPFAIL


class ConfigError(ReclaimError):
    """The configuration (file or environment) is wrong; nothing on the host was changed."""

    exit_code = EXIT_CONFIG


class PermanentError(ReclaimError):
    """The API refused in a way retrying cannot fix (permission, unknown allocation)."""

    exit_code = EXIT_PERMANENT


class TransientError(ReclaimError):
    """Something that may work later: IMDS, NAT or API unreachable, throttled."""


class DeadlineExceeded(TransientError):
    """The run's deadline passed."""


class Terminated(TransientError):
    """A signal (SIGTERM, SIGINT, SIGHUP) asked the run to stop."""


class LockBusy(TransientError):
    """Another run holds the lock."""


class IdentityMismatch(TransientError):
    """IMDS answered with another instance's identity during the detour: a pin is missing."""


class Contested(TransientError):
    """Another instance kept taking the Elastic IP right after this one associated it."""
