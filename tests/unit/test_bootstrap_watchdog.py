"""The watchdog: probes only after the payload holds the address and a grace period, counts failures in
a row, reports the instance unhealthy once, and probes a real local service over TCP and HTTP.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap import watchdog
from bootstrap.config import HealthCheck, parse_config
from bootstrap.state import Marks
from tests.unit.test_bootstrap_fakes import SELF, Rig

BASE: dict[str, Any] = {
    "version": 1,
    "region": "us-east-1",
    "allocation_id": "eipalloc-0123",
    "nat_by_subnet": {"subnet-0aaa": "10.0.0.4"},
}


class World:
    def __init__(self, tmp: Path, health_check: dict[str, Any] | None = None) -> None:
        self.directory = str(tmp)
        self.answers: list[str | None] = []
        self.reported: list[str] = []
        self.clock = 10_000.0
        config = parse_config({**BASE, "health_check": health_check or {"port": 8080, "failures": 3}})
        self.watch = watchdog.Watch(
            config,
            self.directory,
            instance_id=lambda: SELF,
            set_unhealthy=self.reported.append,
            probe=lambda check: self.answers.pop(0),
            now=lambda: self.clock,
        )

    def claimed(self, ago: float = 600) -> None:
        Marks(self.directory).mark("claimed", SELF)
        path = os.path.join(self.directory, "claimed.done")
        os.utime(path, (self.clock - ago, self.clock - ago))


def test_no_probe_before_the_payload_holds_the_address(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.answers = ["refused"] * 5
    for _ in range(5):
        assert w.watch.run() == 0
    assert w.reported == [] and len(w.answers) == 5  # never probed


def test_no_probe_in_the_grace_period(tmp_path: Path) -> None:
    w = World(tmp_path, {"port": 8080, "grace_seconds": 120})
    w.claimed(ago=30)
    w.answers = ["refused"] * 5
    assert w.watch.run() == 0
    assert len(w.answers) == 5


def test_three_failures_in_a_row_report_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = World(tmp_path)
    w.claimed()
    w.answers = ["refused", None, "refused", "refused", "refused", "refused"]
    for _ in range(6):
        assert w.watch.run() == 0
    assert w.reported == [SELF]  # after the 3rd failure in a row; the success reset the count
    err = caplog.text
    assert err.count("probe of 127.0.0.1:8080 failed") == 4
    assert "(3 of 3 in a row)" in err
    assert w.answers == ["refused"]  # the last run probed nothing: already reported


def test_the_payload_writes_the_claimed_mark(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    assert rig.main() == 0
    assert Marks(rig.journal.directory).done("claimed", SELF)


def test_a_yielding_instance_is_not_marked(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    tags = [{"Key": "aws:autoscaling:groupName", "Value": "svc-asg"}]
    rig.ec2.instances = {
        SELF: {"InstanceId": SELF, "LaunchTime": "2026-01-01", "State": {"Name": "running"}, "Tags": tags},
        "i-0fedcba9876543210": {
            "InstanceId": "i-0fedcba9876543210",
            "LaunchTime": "2026-02-01",
            "State": {"Name": "running"},
            "Tags": tags,
        },
    }
    assert rig.main() == 0
    assert not Marks(rig.journal.directory).done("claimed", SELF)


def _mark_stamp(path: str) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_ino, found.st_mtime_ns


@pytest.mark.parametrize("grace", [60, 300, 600])
def test_re_checks_do_not_restart_the_grace_period(tmp_path: Path, grace: int) -> None:
    """Two simulated hours: the boot run, the re-check timer every 5 min, the watchdog every 10 s, and a
    service that never answers. The watchdog reports once, after the grace and three failed probes."""
    rig = Rig(tmp_path)
    directory = rig.journal.directory
    mark = os.path.join(directory, "claimed.done")
    start = 1_000_000.0  # the simulated clock's epoch: a written mark gets this clock's time, below
    now = start
    config = parse_config({**BASE, "health_check": {"port": 8080, "failures": 3, "grace_seconds": grace}})
    probed: list[float] = []
    reported: list[float] = []

    def dead(check: HealthCheck) -> str:
        probed.append(now)
        return "ConnectionRefusedError: [Errno 111] Connection refused"

    watch = watchdog.Watch(
        config,
        directory,
        instance_id=lambda: SELF,
        set_unhealthy=lambda me: reported.append(now),
        probe=dead,
        now=lambda: now,
    )
    # The boot run at 0 s, then the re-check timer (OnBootSec=5min, OnUnitActiveSec=5min).
    payload_runs = [0.0] + [300.0 * n for n in range(1, 25)]
    for tick in range(0, 2 * 3600, 5):
        now = start + tick
        if tick in payload_runs:
            before = _mark_stamp(mark)
            assert rig.main() == 0
            if _mark_stamp(mark) != before:  # written by this run: its modification time is "now"
                os.utime(mark, (now, now))
        if tick % 10 == 5:  # the watchdog's timer (every 10 s), between the payload's runs
            watch.run()
    assert len(rig.ec2.calls) > 24  # every re-check ran (and found the address already held)
    first = start + grace + 5  # the first watchdog tick at or past the grace
    assert probed[:3] == [first, first + 10, first + 20]  # no probe in the grace, then every 10 s
    assert reported == [first + 20]  # after the third failure in a row, once


@pytest.fixture
def http_service() -> Iterator[tuple[int, list[int]]]:
    statuses = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(statuses[0])
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], statuses
    finally:
        server.shutdown()
        server.server_close()


def test_the_probes_against_a_real_local_service(http_service: tuple[int, list[int]]) -> None:
    port, statuses = http_service
    assert watchdog.probe(HealthCheck(port=port)) is None
    assert watchdog.probe(HealthCheck(port=port, path="/health")) is None
    statuses[0] = 503
    assert watchdog.probe(HealthCheck(port=port, path="/health")) == "HTTP 503"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        closed = free.getsockname()[1]
    assert "ConnectionRefusedError" in (watchdog.probe(HealthCheck(port=closed)) or "")


def _self_signed(directory: Path) -> tuple[str, str]:
    """A certificate for a public name (not 127.0.0.1), signed by its own key: what a service may have."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "service.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("service.example.com")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture
def https_service(tmp_path: Path) -> Iterator[tuple[int, list[int], list[str]]]:
    """An HTTPS server on loopback with a self-signed certificate; the paths it was asked for."""
    import ssl

    statuses, paths = [200], []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            self.send_response(statuses[0])
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*_self_signed(tmp_path))
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], statuses, paths
    finally:
        server.shutdown()
        server.server_close()


def test_tls_probes_against_a_real_tls_service(https_service: tuple[int, list[int], list[str]]) -> None:
    port, statuses, paths = https_service
    config = parse_config({**BASE, "health_check": {"port": port, "path": "/health", "tls": True}})
    assert config.health_check is not None
    # The certificate names service.example.com and is self-signed: the probe still gets its answer.
    assert watchdog.probe(config.health_check) is None
    assert paths == ["/health"]
    statuses[0] = 503
    assert watchdog.probe(config.health_check) == "HTTP 503"
    # Without a path: the TLS handshake is the probe.
    assert watchdog.probe(HealthCheck(port=port, tls=True)) is None
    # Plain HTTP to a TLS port never gets an HTTP answer (what a probe of 443 without tls did).
    assert watchdog.probe(HealthCheck(port=port, path="/health")) is not None


def test_a_tls_probe_of_a_plain_service_fails(http_service: tuple[int, list[int]]) -> None:
    port, _ = http_service
    assert "SSL" in (watchdog.probe(HealthCheck(port=port, path="/health", tls=True)) or "")
    assert watchdog.probe(HealthCheck(port=port, tls=True)) is not None


def test_tls_is_off_unless_configured() -> None:
    config = parse_config({**BASE, "health_check": {"port": 443, "path": "/health"}})
    assert config.health_check is not None and config.health_check.tls is False


def test_the_command_line_without_a_health_check_does_nothing(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    import json

    config.write_text(json.dumps(BASE))
    assert watchdog.main(["--config", str(config)]) == 0


def test_health_check_configuration_errors_name_the_key() -> None:
    from bootstrap.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^config: health_check.port: 70000 is not a whole number"):
        parse_config({**BASE, "health_check": {"port": 70000}})
    with pytest.raises(ConfigError, match=r"^config: health_check.path: 'health'"):
        parse_config({**BASE, "health_check": {"port": 80, "path": "health"}})
    with pytest.raises(ConfigError, match=r"^config: health_check.tls: expected true or false, got str$"):
        parse_config({**BASE, "health_check": {"port": 443, "path": "/", "tls": "yes"}})
