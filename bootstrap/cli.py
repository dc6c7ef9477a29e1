"""Command line: parse, set up logging, lock, run; the only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Optional

from bootstrap.errors import EXIT_CONFIG, EXIT_TEMPFAIL, ConfigError, ReclaimError

LOG = logging.getLogger("bootstrap")

SKIP_PINS_ENV = "EIP_RECLAIM_TEST_SKIP_PINS"
UPTIME_ENV = "EIP_RECLAIM_TEST_UPTIME"


class ElapsedFormatter(logging.Formatter):
    """`+  12 ms message`: milliseconds since the run started, so slow steps stand out in the journal."""

    def __init__(self, start: float) -> None:
        super().__init__()
        self.start = start

    def format(self, record: logging.LogRecord) -> str:
        elapsed = (record.created - self.start) * 1000
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        return f"+{elapsed:5.0f} ms {level}{record.getMessage()}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m bootstrap",
        description="Take this instance's Elastic IP through the subnet's NAT, then restore routing.",
        epilog="Exit codes: 0 held by this instance, 2 configuration error, 3 permission denied or no such "
        "Elastic IP, 75 transient failure (systemd restarts). State: $EIP_RECLAIM_STATE_DIR "
        "(default /run/eip-reclaim).",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the JSON configuration file")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    parser.add_argument("--verbose", action="store_true", help="debug logging (never credentials)")
    return parser


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # time.time() because LogRecord.created is wall-clock; the deadline itself runs on monotonic time.
    handler.setFormatter(ElapsedFormatter(time.time()))
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.DEBUG if verbose else logging.INFO)
    LOG.propagate = False
    # botocore's debug log prints request headers, which carry the session token: keep it quiet.
    logging.getLogger("botocore").setLevel(logging.WARNING)


def parse_skip_pins(value: Optional[str]) -> frozenset[str]:
    from bootstrap.routes import PIN_NAMES  # noqa: PLC0415

    names = frozenset(n.strip() for n in (value or "").split(",") if n.strip())
    unknown = sorted(names - set(PIN_NAMES))
    if unknown:
        raise ConfigError(f"{SKIP_PINS_ENV}: unknown pin {unknown[0]!r} (known: {', '.join(PIN_NAMES)})")
    return names


def parse_uptime(value: Optional[str]) -> Optional[float]:
    """Seconds since a pretended boot, for tests whose host booted long ago (the ABANDON window)."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{UPTIME_ENV}: {value!r} is not a number of seconds") from None


def main(argv: Optional[Sequence[str]] = None, *, deps: Optional[object] = None) -> int:
    """Run the payload; return the exit code. `deps` (a reclaim.Deps) replaces the real world in tests."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:
        # argparse exits on --help (0) and on usage errors (2, as a configuration error).
        return int(stop.code or 0) if isinstance(stop.code, int) else EXIT_CONFIG
    _setup_logging(args.verbose)
    try:
        return _main(args, deps)
    except ReclaimError as err:
        LOG.error("%s (exit %d)", err, err.exit_code)
        return err.exit_code
    except OSError as err:
        LOG.error("%s: %s (exit %d)", type(err).__name__, err, EXIT_TEMPFAIL)
        return EXIT_TEMPFAIL


def _main(args: argparse.Namespace, injected: Optional[object]) -> int:
    from bootstrap import reclaim, resolve  # noqa: PLC0415 (keeps --help fast)
    from bootstrap.aws import ClientFactory, disable_imds_v1  # noqa: PLC0415
    from bootstrap.clock import Deadline, SystemClock  # noqa: PLC0415
    from bootstrap.config import load_config  # noqa: PLC0415
    from bootstrap.imds import HttpImds  # noqa: PLC0415
    from bootstrap.state import Journal, Lock, state_dir  # noqa: PLC0415

    config = load_config(args.config)
    skip_pins = frozenset[str]()
    uptime: Optional[float] = None
    for name in (SKIP_PINS_ENV, UPTIME_ENV):
        if os.environ.get(name) and not config.test:
            LOG.warning("%s ignored: test switches apply only to a test configuration", name)
    if config.test:
        skip_pins = parse_skip_pins(os.environ.get(SKIP_PINS_ENV))
        uptime = parse_uptime(os.environ.get(UPTIME_ENV))
    if isinstance(injected, reclaim.Deps):
        deps = injected
        deadline = Deadline(deps.clock, config.deadline_seconds)
    else:
        disable_imds_v1()
        clock = SystemClock(uptime)
        deadline = Deadline(clock, config.deadline_seconds)
        clients = ClientFactory(config.region)
        deps = reclaim.Deps(
            clock=clock,
            imds=HttpImds(config.imds_url, deadline),
            netlink=reclaim.pyroute2_netlink,
            # A dry run makes no API call: no need to load botocore at all.
            clients=clients if args.dry_run else clients.start(),
            journal=Journal(state_dir()),
            skip_pins=skip_pins,
        )
    LOG.info(
        "config: %s, %s in %s, %d subnet(s), deadline %g s%s",
        args.config,
        config.allocation_id,
        config.region,
        len(config.nat_by_subnet),
        config.deadline_seconds,
        " (dry run)" if args.dry_run else "",
    )
    if args.dry_run:
        return reclaim.dry_run(config, deps, sys.stdout)
    lock = Lock(deps.journal.directory, deps.clock)
    lock.acquire()
    LOG.info("lock: %s held", lock.path)
    try:
        deps.interrupts.install(config.deadline_seconds)
        try:
            # Every name lookup off the main thread and bounded: a hung resolver must not hold a stop.
            with resolve.installed(resolve.BoundedResolver()):
                return reclaim.run(config, deps, deadline)
        finally:
            deps.interrupts.uninstall(restore_handlers=injected is not None)
    finally:
        lock.release()
