"""The watchdog: probe the service on this instance; after N failures in a row, report the instance
unhealthy to its Auto Scaling group, so a replacement comes in seconds rather than after EC2's status
checks (minutes).

    python3 -m bootstrap.watchdog --config /etc/eip-reclaim/config.json

One probe per run, from `eip-reclaim-watchdog.timer`; the count of failures in a row is kept in the
state directory. It never reports an instance that the payload has not yet succeeded on (the mark
`claimed.done`), nor before `grace_seconds` have passed since then, and `SetInstanceHealth` respects the
group's own health-check grace period. It reports once per instance.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from bootstrap.config import Config, HealthCheck, load_config
from bootstrap.errors import EXIT_OK, EXIT_TEMPFAIL, ReclaimError
from bootstrap.reclaim import CLAIMED_MARK
from bootstrap.state import Marks, state_dir, write_atomically

LOG = logging.getLogger("bootstrap.watchdog")

# A service on this host answers a local probe in milliseconds; two seconds is a hung one.
PROBE_TIMEOUT_SECONDS = 2.0
REPORTED_MARK = "unhealthy"
FAILURES_FILE = "watchdog-failures"


def _unverified_tls() -> ssl.SSLContext:
    """TLS without certificate checks, for the probe only.

    The probe asks whether this host's own service answers, over loopback (127.0.0.1): the service's
    certificate is issued for its public name, never for 127.0.0.1, and may be self-signed or from a
    private CA this host does not trust. Verifying it would fail every probe of a healthy service. So
    the probe checks that TLS is spoken and the service answers; it is not a check of the certificate
    (expiry, name, chain), and nothing secret crosses this connection.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def probe(check: HealthCheck, timeout: float = PROBE_TIMEOUT_SECONDS) -> Optional[str]:
    """None if the service answers; else why not, in a few words."""
    try:
        if check.path is None:
            with socket.create_connection(("127.0.0.1", check.port), timeout=timeout) as sock:
                if check.tls:
                    # A completed handshake is the answer.
                    _unverified_tls().wrap_socket(sock).close()
                return None
        conn: http.client.HTTPConnection
        if check.tls:
            conn = http.client.HTTPSConnection(
                "127.0.0.1", check.port, timeout=timeout, context=_unverified_tls()
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", check.port, timeout=timeout)
        try:
            conn.request("GET", check.path, headers={"User-Agent": "eip-reclaim-watchdog"})
            status = conn.getresponse().status
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as err:
        return f"{type(err).__name__}: {err}"
    return None if 200 <= status < 400 else f"HTTP {status}"


@dataclass
class Watch:
    """One watchdog run's world (the real one from `main`; fakes in tests)."""

    config: Config
    directory: str
    instance_id: Callable[[], str]
    set_unhealthy: Callable[[str], None]
    probe: Callable[[HealthCheck], Optional[str]] = probe
    now: Callable[[], float] = time.time

    def _failures(self) -> int:
        try:
            with open(os.path.join(self.directory, FAILURES_FILE), encoding="ascii") as handle:
                return int(handle.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _set_failures(self, count: int) -> None:
        write_atomically(self.directory, os.path.join(self.directory, FAILURES_FILE), str(count).encode())

    def run(self) -> int:
        check = self.config.health_check
        if check is None:
            LOG.info("watchdog: no health_check configured; nothing to probe")
            return EXIT_OK
        me = self.instance_id()
        marks = Marks(self.directory)
        if not marks.done(CLAIMED_MARK, me):
            LOG.info("watchdog: the payload has not succeeded on %s yet; not probing", me)
            return EXIT_OK
        if marks.done(REPORTED_MARK, me):
            LOG.info("watchdog: %s already reported unhealthy; waiting for its replacement", me)
            return EXIT_OK
        since = self.now() - os.path.getmtime(os.path.join(self.directory, f"{CLAIMED_MARK}.done"))
        if since < check.grace_seconds:
            LOG.info(
                "watchdog: in the grace period (%.0f of %d s since the claim)", since, check.grace_seconds
            )
            return EXIT_OK
        failure = self.probe(check)
        scheme = "https://" if check.tls and check.path else ("tls " if check.tls else "")
        target = f"{scheme}127.0.0.1:{check.port}{check.path or ''}"
        if failure is None:
            if self._failures():
                LOG.info("watchdog: %s answers again", target)
                self._set_failures(0)
            return EXIT_OK
        count = self._failures() + 1
        self._set_failures(count)
        LOG.warning(
            "watchdog: probe of %s failed (%d of %d in a row): %s", target, count, check.failures, failure
        )
        if count < check.failures:
            return EXIT_OK
        LOG.error("watchdog: reporting %s unhealthy to its Auto Scaling group", me)
        self.set_unhealthy(me)
        marks.mark(REPORTED_MARK, me)
        LOG.info("watchdog: SetInstanceHealth Unhealthy sent for %s", me)
        return EXIT_OK


def _real_watch(config: Config) -> Watch:
    from bootstrap.aws import ClientFactory, disable_imds_v1  # noqa: PLC0415
    from bootstrap.clock import Deadline, SystemClock  # noqa: PLC0415
    from bootstrap.imds import HttpImds  # noqa: PLC0415

    disable_imds_v1()
    # One probe and at most one API call: well inside the timer's period.
    deadline = Deadline(SystemClock(), 30)
    imds = HttpImds(config.imds_url, deadline)

    def set_unhealthy(instance_id: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        client: Any = (
            ClientFactory(config.region)
            .start()
            .autoscaling(config.autoscaling_endpoint_url, imds.credentials())
        )
        try:
            client.set_instance_health(
                InstanceId=instance_id, HealthStatus="Unhealthy", ShouldRespectGracePeriod=True
            )
        except (BotoCoreError, ClientError) as err:
            raise ReclaimError(f"watchdog: SetInstanceHealth: {' '.join(str(err).split())}") from None
        finally:
            client.close()

    return Watch(config, state_dir(), imds.instance_id, set_unhealthy)


def main(argv: Optional[Sequence[str]] = None, *, watch: Optional[Watch] = None) -> int:
    """One probe; the exit code (0, or 2/75 as the payload's) for systemd."""
    parser = argparse.ArgumentParser(prog="python3 -m bootstrap.watchdog", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, metavar="FILE")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0) if isinstance(stop.code, int) else 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    try:
        return (watch or _real_watch(load_config(args.config))).run()
    except ReclaimError as err:
        LOG.error("%s (exit %d)", err, err.exit_code)
        return err.exit_code
    except OSError as err:
        LOG.error("watchdog: %s: %s (exit %d)", type(err).__name__, err, EXIT_TEMPFAIL)
        return EXIT_TEMPFAIL


if __name__ == "__main__":
    raise SystemExit(main())
