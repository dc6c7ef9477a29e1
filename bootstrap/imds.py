"""IMDSv2 client: token first, short timeouts, bounded retries; never falls back to IMDSv1."""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional, Protocol

from bootstrap.clock import Deadline
from bootstrap.errors import TransientError
from bootstrap.interrupts import interruptible

LOG = logging.getLogger(__name__)

# One run is bounded by the deadline (at most an hour); a token that outlives it is never needed.
TOKEN_TTL_SECONDS = 3600
# IMDS answers from the hypervisor in well under 10 ms; a second means it is not answering at all.
REQUEST_TIMEOUT_SECONDS = 1.0
# Early boot can race the link coming up; five tries over about 1.5 s ride that out without hiding
# a missing route for long.
ATTEMPTS = 5
BACKOFF_SECONDS = 0.1


class ImdsError(TransientError):
    """IMDS did not answer usefully within its retries."""


class ImdsNotFound(ImdsError):
    """IMDS answered 404 for a path."""


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    token: Optional[str] = field(default=None, repr=False)


@dataclass(frozen=True)
class Identity:
    instance_id: str
    mac: str
    subnet_id: str
    subnet_cidr: str
    vpc_cidrs: tuple[str, ...]
    public_ipv4: Optional[str]


class Imds(Protocol):
    def identity(self) -> Identity: ...

    def instance_id(self) -> str: ...

    def credentials(self) -> Optional[Credentials]: ...

    def target_lifecycle_state(self) -> Optional[str]:
        """Where Auto Scaling takes this instance (`InService`, `Warmed:Stopped`...); None outside a group."""
        ...


class HttpImds:
    """IMDSv2 over a fresh HTTP connection per request (routes may change between two requests)."""

    def __init__(self, base_url: str, deadline: Deadline) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self._host = parts.hostname or "169.254.169.254"
        self._port = parts.port or 80
        self._deadline = deadline
        self._token: Optional[str] = None

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        conn = http.client.HTTPConnection(
            self._host, self._port, timeout=self._deadline.timeout(REQUEST_TIMEOUT_SECONDS)
        )
        try:
            with interruptible():
                conn.request(method, path, headers=headers)
                response = conn.getresponse()
                return response.status, response.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def _fetch_token(self) -> str:
        status, body = self._request(
            "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)}
        )
        if status != 200 or not body:
            raise ImdsError(f"imds: token request answered HTTP {status}")
        return body

    def get(self, path: str) -> str:
        """GET /latest/meta-data/<path> with the session token; 404 raises ImdsNotFound."""
        last = "no attempt"
        for attempt in range(ATTEMPTS):
            if attempt:
                self._deadline.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1), f"retrying IMDS {path}")
            self._deadline.check(f"reading IMDS {path}")
            try:
                if self._token is None:
                    self._token = self._fetch_token()
                status, body = self._request(
                    "GET", f"/latest/meta-data/{path}", {"X-aws-ec2-metadata-token": self._token}
                )
            except (OSError, http.client.HTTPException) as err:
                last = f"{type(err).__name__}: {err}"
                LOG.debug("imds: %s: attempt %d failed: %s", path, attempt + 1, last)
                continue
            except ImdsError as err:
                last = str(err)
                continue
            if status == 200:
                return body
            if status == 404:
                raise ImdsNotFound(f"imds: {path}: not found")
            if status == 401:
                # The token expired or another IMDS answered (its tokens differ): ask for a new one.
                self._token = None
            last = f"HTTP {status}"
            LOG.debug("imds: %s: attempt %d answered %s", path, attempt + 1, last)
        raise ImdsError(f"imds: {path}: no answer after {ATTEMPTS} attempts ({last})")

    def instance_id(self) -> str:
        return self.get("instance-id").strip()

    def identity(self) -> Identity:
        instance_id = self.instance_id()
        mac = self.get("mac").strip().lower()
        base = f"network/interfaces/macs/{mac}"
        subnet_id = self.get(f"{base}/subnet-id").strip()
        subnet_cidr = _cidr("subnet-ipv4-cidr-block", self.get(f"{base}/subnet-ipv4-cidr-block"))
        vpc_cidrs = tuple(
            _cidr("vpc-ipv4-cidr-blocks", line)
            for line in self.get(f"{base}/vpc-ipv4-cidr-blocks").split()
            if line.strip()
        )
        try:
            public: Optional[str] = self.get("public-ipv4").strip() or None
        except ImdsNotFound:
            public = None
        return Identity(instance_id, mac, subnet_id, subnet_cidr, vpc_cidrs, public)

    def target_lifecycle_state(self) -> Optional[str]:
        try:
            return self.get("autoscaling/target-lifecycle-state").strip() or None
        except ImdsNotFound:
            return None

    def credentials(self) -> Optional[Credentials]:
        """The instance role's credentials, or None when the instance has no role."""
        try:
            roles = self.get("iam/security-credentials/").split()
        except ImdsNotFound:
            return None
        if not roles:
            return None
        path = f"iam/security-credentials/{roles[0]}"
        # An odd document is a transient IMDS problem (75), never a crash; values are never quoted.
        try:
            document = json.loads(self.get(path))
        except ValueError:
            raise ImdsError(f"imds: {path}: not a JSON document") from None
        if not isinstance(document, dict):
            raise ImdsError(f"imds: {path}: expected a JSON object, got {type(document).__name__}")
        if document.get("Code", "Success") != "Success":
            raise ImdsError(f"imds: role {roles[0]} credentials not ready (Code {document.get('Code')})")
        for key in ("AccessKeyId", "SecretAccessKey"):
            if not isinstance(document.get(key), str) or not document[key]:
                raise ImdsError(f"imds: {path}: field {key} is missing or not a non-empty string")
        token = document.get("Token")
        if token is not None and not isinstance(token, str):
            raise ImdsError(f"imds: {path}: field Token is not a string")
        return Credentials(document["AccessKeyId"], document["SecretAccessKey"], token)


def _cidr(name: str, text: str) -> str:
    try:
        return str(ipaddress.IPv4Network(text.strip()))
    except ValueError:
        raise ImdsError(f"imds: {name}: {text.strip()!r} is not an IPv4 CIDR") from None
