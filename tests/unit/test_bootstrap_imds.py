"""The IMDSv2 client against a local emulator: tokens only, 404s, retries, timeouts inside the deadline."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap.clock import Deadline, SystemClock
from bootstrap.errors import TransientError
from bootstrap.imds import HttpImds, ImdsError, ImdsNotFound
from tests.kernel.fake_imds import Handler, Server

IDENTITY = {
    "instance_id": "i-0123456789abcdef0",
    "mac": "02:00:0a:00:00:0a",
    "subnet_id": "subnet-0aaa",
    "subnet_cidr": "10.0.0.0/24",
    "vpc_cidrs": ["10.0.0.0/16", "10.1.0.0/16"],
    "public_ipv4": None,
    "role": "svc-role",
}


class FlakyHandler(Handler):
    """Answers 500 to the first `server.failures` GETs."""

    def do_GET(self) -> None:
        if self.server.failures > 0:  # type: ignore[attr-defined]
            self.server.failures -= 1  # type: ignore[attr-defined]
            self._reply(500)
            return
        super().do_GET()


def _serve(tmp_path: Path, identity: dict[str, Any], handler: type = Handler) -> Iterator[tuple[Server, str]]:
    server = Server(("127.0.0.1", 0), identity, tmp_path / "imds.log")
    server.RequestHandlerClass = handler
    server.failures = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def imds(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    yield from _serve(tmp_path, IDENTITY, FlakyHandler)


def _requests(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "imds.log").read_text().splitlines()]


def _client(url: str, seconds: float = 30) -> HttpImds:
    return HttpImds(url, Deadline(SystemClock(), seconds))


def test_identity_is_read_with_a_token_only(imds: tuple[Server, str], tmp_path: Path) -> None:
    # aws-facts: facts-imds-token, facts-imds-identity-paths
    _, url = imds
    identity = _client(url).identity()
    assert identity.instance_id == "i-0123456789abcdef0"
    assert identity.subnet_id == "subnet-0aaa"
    assert identity.subnet_cidr == "10.0.0.0/24"
    assert identity.vpc_cidrs == ("10.0.0.0/16", "10.1.0.0/16")
    assert identity.public_ipv4 is None
    requests = _requests(tmp_path)
    # One token, then every GET carries it: never an IMDSv1 request (the emulator would answer 401).
    assert requests[0] == {"method": "PUT", "path": "/latest/api/token", "status": 200}
    assert all(r["status"] in (200, 404) for r in requests)
    assert sum(r["method"] == "PUT" for r in requests) == 1


def test_public_ipv4_when_present(tmp_path: Path) -> None:
    # aws-facts: facts-imds-identity-paths
    for _, url in _serve(tmp_path, {**IDENTITY, "public_ipv4": "198.51.100.7"}):
        assert _client(url).identity().public_ipv4 == "198.51.100.7"


def test_credentials_of_the_role(imds: tuple[Server, str]) -> None:
    _, url = imds
    creds = _client(url).credentials()
    assert creds is not None and creds.access_key == "ASIAFAKEFAKEFAKE"
    assert "fake-secret" not in repr(creds) and "fake-session" not in repr(creds)


def test_no_role_means_no_credentials(tmp_path: Path) -> None:
    for _, url in _serve(tmp_path, {**IDENTITY, "role": None}):
        assert _client(url).credentials() is None


def test_404_is_not_retried(imds: tuple[Server, str], tmp_path: Path) -> None:
    _, url = imds
    with pytest.raises(ImdsNotFound):
        _client(url).get("no/such/path")
    assert [r["status"] for r in _requests(tmp_path)] == [200, 404]


def test_server_errors_are_retried(imds: tuple[Server, str], tmp_path: Path) -> None:
    server, url = imds
    server.failures = 2  # type: ignore[attr-defined]
    assert _client(url).instance_id() == "i-0123456789abcdef0"
    assert [r["status"] for r in _requests(tmp_path)] == [200, 500, 500, 200]


def test_an_unknown_token_is_renewed(imds: tuple[Server, str], tmp_path: Path) -> None:
    # aws-facts: facts-imds-token
    server, url = imds
    client = _client(url)
    client.instance_id()
    server.tokens.clear()  # as if another IMDS (the NAT's) were answering now
    assert client.instance_id() == "i-0123456789abcdef0"
    assert [r["method"] for r in _requests(tmp_path)] == ["PUT", "GET", "GET", "PUT", "GET"]


def test_persistent_failure_gives_up_after_bounded_retries(imds: tuple[Server, str], tmp_path: Path) -> None:
    server, url = imds
    server.failures = 100  # type: ignore[attr-defined]
    with pytest.raises(ImdsError, match="no answer after 5 attempts"):
        _client(url).instance_id()
    assert sum(r["status"] == 500 for r in _requests(tmp_path)) == 5


def test_a_silent_imds_is_bounded_by_the_deadline() -> None:
    # A listener that never answers: connect succeeds, the read times out.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        started = time.monotonic()
        with pytest.raises(TransientError) as caught:
            _client(f"http://127.0.0.1:{silent.getsockname()[1]}", seconds=1.5).instance_id()
        took = time.monotonic() - started
    finally:
        silent.close()
    assert caught.value.__class__.__name__ in ("ImdsError", "DeadlineExceeded")
    print(f"silent IMDS with a 1.5 s deadline: gave up after {took:.2f} s")
    assert took < 3


def test_malformed_cidr_is_an_error(tmp_path: Path) -> None:
    # aws-facts: facts-imds-identity-paths
    for _, url in _serve(tmp_path, {**IDENTITY, "subnet_cidr": "10.0.0.0/33"}):
        with pytest.raises(ImdsError, match="subnet-ipv4-cidr-block"):
            _client(url).identity()


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ("{not json", "not a JSON document"),
        ("[]", "expected a JSON object"),
        ('{"Code": "Success", "SecretAccessKey": "s", "Token": "t"}', "field AccessKeyId"),
        ('{"Code": "Success", "AccessKeyId": "A", "Token": "t"}', "field SecretAccessKey"),
        ('{"Code": "Success", "AccessKeyId": 5, "SecretAccessKey": "s"}', "field AccessKeyId"),
        ('{"Code": "Success", "AccessKeyId": "A", "SecretAccessKey": "s", "Token": 7}', "field Token"),
    ],
)
def test_an_odd_credentials_document_is_transient_and_names_the_field(
    imds: tuple[Server, str], document: str, named: str
) -> None:
    server, url = imds
    server.paths["iam/security-credentials/svc-role"] = document
    with pytest.raises(ImdsError, match=named) as caught:
        _client(url).credentials()
    assert caught.value.exit_code == 75
    assert "iam/security-credentials/svc-role" in str(caught.value)
    assert "\n" not in str(caught.value)
