"""The configuration file: parsed and validated once, errors name the key."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from bootstrap.errors import ConfigError

SUPPORTED_VERSION = 1
# Long enough for a slow NAT and API retries, short enough that systemd's TimeoutStartSec (330 s in the
# units) stops a stuck run only after it has restored its routes itself.
DEFAULT_DEADLINE_SECONDS = 240.0
# A deadline under a second cannot reach the API. Past 270 s, systemd's SIGTERM at TimeoutStartSec=330s
# would cut the run before its deadline: the last minute is for the restore and the lifecycle call.
MIN_DEADLINE_SECONDS = 1.0
MAX_DEADLINE_SECONDS = 270.0
UNIT_TIMEOUT_START = "TimeoutStartSec=330s"
DEFAULT_IMDS_URL = "http://169.254.169.254"

# AWS IDs are 8 or 17 lower-case hex digits after the prefix; shorter forms are accepted so that
# hand-written examples (subnet-0aaa) and test fixtures validate, but never anything non-hex.
_ALLOCATION_ID = re.compile(r"eipalloc-[0-9a-f]{1,17}")
_SUBNET_ID = re.compile(r"subnet-[0-9a-f]{1,17}")
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]+")
_URL = re.compile(r"https?://[^\s/]+(/\S*)?")
_HOOK_NAME = re.compile(r"[A-Za-z0-9\-_/.@:]{1,255}")

_REQUIRED = ("version", "region", "allocation_id")
# The egress strategies (bootstrap/egress): the first is the default; the first two go through a NAT.
EGRESS_KINDS = ("policy-route", "main-table", "direct")
NAT_EGRESS = ("policy-route", "main-table")
_ENDPOINT_KEYS = (
    "ec2_endpoint_url",
    "autoscaling_endpoint_url",
    "cloudformation_endpoint_url",
    "cloudwatch_endpoint_url",
)
_OPTIONAL = (
    "lifecycle_hook",
    "deadline_seconds",
    *_ENDPOINT_KEYS,
    "imds_url",
    "signal",
    "metrics",
    "test",
    "nat_by_subnet",
    "egress",
    "dualstack",
    "health_check",
)
_STACK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,127}")
_LOGICAL_ID = re.compile(r"[A-Za-z0-9]{1,255}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_./#:-]{1,255}")
_DIMENSION = re.compile(r"[A-Za-z0-9_./#:@ -]{1,255}")
# A lifecycle hook's heartbeat timeout: Auto Scaling accepts 30 s to 7200 s.
MIN_HOOK_TIMEOUT_SECONDS = 30
MAX_HOOK_TIMEOUT_SECONDS = 7200


@dataclass(frozen=True)
class LifecycleHook:
    auto_scaling_group: str
    hook: str
    # The hook's heartbeat timeout, when known: the window in which another attempt can still complete it.
    timeout_seconds: Optional[int] = None


@dataclass(frozen=True)
class StackSignal:
    """The resource of a CloudFormation stack that waits for this instance's signal (creation policy)."""

    stack: str
    resource: str


@dataclass(frozen=True)
class HealthCheck:
    """The watchdog's probe of the service on this instance (bootstrap/watchdog.py)."""

    port: int
    # HTTP GET of this path (any 2xx or 3xx is healthy); None: a TCP connect is the probe.
    path: Optional[str] = None
    # Consecutive failed probes before the instance reports itself unhealthy.
    failures: int = 3
    # No probe until the service has had this long since the payload took the address.
    grace_seconds: int = 60
    # The service speaks TLS on the port: the probe is HTTPS (or a TLS handshake without a path).
    tls: bool = False


@dataclass(frozen=True)
class Metrics:
    """Where the run's outcome is published as CloudWatch metrics (dimension Service=<service>)."""

    namespace: str
    service: str


@dataclass(frozen=True)
class Config:
    version: int
    region: str
    allocation_id: str
    nat_by_subnet: Mapping[str, str] = field(default_factory=dict)
    lifecycle_hook: Optional[LifecycleHook] = None
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS
    ec2_endpoint_url: Optional[str] = None
    autoscaling_endpoint_url: Optional[str] = None
    imds_url: str = DEFAULT_IMDS_URL
    cloudformation_endpoint_url: Optional[str] = None
    cloudwatch_endpoint_url: Optional[str] = None
    signal: Optional[StackSignal] = None
    metrics: Optional[Metrics] = None
    # A test run (the VPC lab, the kernel tests): plain-HTTP endpoints and the test switches are allowed.
    test: bool = False
    egress: str = "policy-route"
    health_check: Optional[HealthCheck] = None
    # With egress direct: EC2's dual-stack endpoint (an IPv6-only way out).
    dualstack: bool = False

    def nat_for(self, subnet_id: str) -> str:
        """The NAT address of `subnet_id`, or a configuration error (no route is touched before this)."""
        try:
            return self.nat_by_subnet[subnet_id]
        except KeyError:
            known = ", ".join(sorted(self.nat_by_subnet))
            raise ConfigError(
                f"config: nat_by_subnet: no NAT for this instance's subnet {subnet_id} (known: {known})"
            ) from None


def _fail(key: str, problem: str) -> ConfigError:
    return ConfigError(f"config: {key}: {problem}")


def _string(key: str, value: Any, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str):
        raise _fail(key, f"expected a string, got {type(value).__name__}")
    if not pattern.fullmatch(value):
        raise _fail(key, f"{value!r} is not {what}")
    return value


def _ipv4(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(key, f"expected a string, got {type(value).__name__}")
    try:
        address = ipaddress.IPv4Address(value)
    except ipaddress.AddressValueError:
        raise _fail(key, f"{value!r} is not an IPv4 address") from None
    if address.is_unspecified or address.is_multicast or address.is_loopback or address.is_link_local:
        raise _fail(key, f"{value!r} cannot be a NAT instance's address")
    return str(address)


def _nat_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _fail("nat_by_subnet", f"expected an object, got {type(value).__name__}")
    if not value:
        raise _fail("nat_by_subnet", "must name at least one subnet")
    result = {}
    for subnet, nat in value.items():
        key = f"nat_by_subnet[{json.dumps(subnet)}]"
        if not _SUBNET_ID.fullmatch(subnet):
            raise _fail(key, f"{subnet!r} is not a subnet ID (subnet- and hex digits)")
        result[subnet] = _ipv4(key, nat)
    return result


def _object(
    key: str, value: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A JSON object with exactly these keys (the optional ones may be absent)."""
    if not isinstance(value, dict):
        raise _fail(key, f"expected an object, got {type(value).__name__}")
    for name in value:
        if name not in required and name not in optional:
            raise _fail(f"{key}.{name}", "unknown key")
    for name in required:
        if name not in value:
            raise _fail(f"{key}.{name}", "required key is missing")
    return value


def _hook(value: Any) -> LifecycleHook:
    value = _object("lifecycle_hook", value, ("auto_scaling_group", "hook"), ("timeout_seconds",))
    timeout = value.get("timeout_seconds")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int)
        or not MIN_HOOK_TIMEOUT_SECONDS <= timeout <= MAX_HOOK_TIMEOUT_SECONDS
    ):
        raise _fail(
            "lifecycle_hook.timeout_seconds",
            f"{timeout!r} is not a whole number of seconds from {MIN_HOOK_TIMEOUT_SECONDS} to "
            f"{MAX_HOOK_TIMEOUT_SECONDS} (a lifecycle hook's heartbeat timeout)",
        )
    return LifecycleHook(
        auto_scaling_group=_string(
            "lifecycle_hook.auto_scaling_group", value["auto_scaling_group"], _HOOK_NAME, "a group name"
        ),
        hook=_string("lifecycle_hook.hook", value["hook"], _HOOK_NAME, "a hook name"),
        timeout_seconds=timeout,
    )


def _signal(value: Any) -> StackSignal:
    value = _object("signal", value, ("stack", "resource"))
    return StackSignal(
        stack=_string("signal.stack", value["stack"], _STACK_NAME, "a CloudFormation stack name"),
        resource=_string("signal.resource", value["resource"], _LOGICAL_ID, "a logical resource ID"),
    )


def _whole(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(key, f"{value!r} is not a whole number from {low} to {high}")
    return value


def _health_check(value: Any) -> HealthCheck:
    value = _object("health_check", value, ("port",), ("path", "failures", "grace_seconds", "tls"))
    path = value.get("path")
    if path is not None and (not isinstance(path, str) or not re.fullmatch(r"/[^\s]*", path)):
        raise _fail("health_check.path", f"{path!r} is not an absolute URL path (starting with /)")
    return HealthCheck(
        port=_whole("health_check.port", value["port"], 1, 65535),
        path=path,
        failures=_whole("health_check.failures", value.get("failures", 3), 1, 100),
        grace_seconds=_whole("health_check.grace_seconds", value.get("grace_seconds", 60), 0, 3600),
        tls=_boolean("health_check.tls", value.get("tls", False)),
    )


def _metrics(value: Any) -> Metrics:
    value = _object("metrics", value, ("namespace", "service"))
    return Metrics(
        namespace=_string("metrics.namespace", value["namespace"], _NAMESPACE, "a CloudWatch namespace"),
        service=_string("metrics.service", value["service"], _DIMENSION, "a dimension value"),
    )


def _deadline(value: Any) -> float:
    # bool is an int in Python; `true` is not a number of seconds.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail("deadline_seconds", f"expected a number, got {type(value).__name__}")
    if not MIN_DEADLINE_SECONDS <= value <= MAX_DEADLINE_SECONDS:
        raise _fail(
            "deadline_seconds",
            f"{value!r} is outside {MIN_DEADLINE_SECONDS:g}..{MAX_DEADLINE_SECONDS:g} seconds"
            f" (the units' {UNIT_TIMEOUT_START} must leave the run time to restore its routes and report)",
        )
    return float(value)


def parse_config(data: Any) -> Config:
    """Validate a decoded configuration document; raise ConfigError naming the first bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a JSON object at the top level, got {type(data).__name__}")
    for key in data:
        if key not in _REQUIRED and key not in _OPTIONAL:
            raise _fail(str(key), "unknown key")
    for key in _REQUIRED:
        if key not in data:
            raise _fail(key, "required key is missing")
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise _fail("version", f"expected an integer, got {type(version).__name__}")
    if version != SUPPORTED_VERSION:
        raise _fail("version", f"{version} is not supported (this payload reads version {SUPPORTED_VERSION})")
    test, dualstack = (
        _boolean("test", data.get("test", False)),
        _boolean("dualstack", data.get("dualstack", False)),
    )
    egress = data.get("egress", EGRESS_KINDS[0])
    if egress not in EGRESS_KINDS:
        raise _fail("egress", f"{egress!r} is not one of {', '.join(EGRESS_KINDS)}")
    if egress in NAT_EGRESS and "nat_by_subnet" not in data:
        raise _fail("nat_by_subnet", f"required key is missing (egress {egress} goes through a NAT)")
    if dualstack and egress != "direct":
        raise _fail("dualstack", f"applies to egress direct only, not {egress}")
    endpoints = {key: _endpoint(key, data.get(key), test=test) for key in _ENDPOINT_KEYS}
    hook, signal, metrics = data.get("lifecycle_hook"), data.get("signal"), data.get("metrics")
    return Config(
        version=version,
        region=_string("region", data["region"], _REGION, "an AWS region name"),
        allocation_id=_string(
            "allocation_id",
            data["allocation_id"],
            _ALLOCATION_ID,
            "an allocation ID (eipalloc- and hex digits)",
        ),
        nat_by_subnet=_nat_map(data["nat_by_subnet"]) if "nat_by_subnet" in data else {},
        egress=egress,
        dualstack=dualstack,
        health_check=None if data.get("health_check") is None else _health_check(data["health_check"]),
        lifecycle_hook=None if hook is None else _hook(hook),
        deadline_seconds=_deadline(data.get("deadline_seconds", DEFAULT_DEADLINE_SECONDS)),
        imds_url=_string("imds_url", data.get("imds_url", DEFAULT_IMDS_URL), _URL, "an http(s) URL").rstrip(
            "/"
        ),
        signal=None if signal is None else _signal(signal),
        metrics=None if metrics is None else _metrics(metrics),
        test=test,
        **endpoints,
    )


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, f"expected true or false, got {type(value).__name__}")
    return value


def _endpoint(key: str, value: Any, *, test: bool) -> Optional[str]:
    """An API endpoint override: HTTPS, or plain HTTP in a test configuration only."""
    if value is None:
        return None
    url = _string(key, value, _URL, "an http(s) URL")
    if url.startswith("http://") and not test:
        # Signed requests and the role's session token would cross the NAT in clear.
        raise _fail(key, f'{url!r}: plain http:// is allowed only in a test configuration ("test": true)')
    return url


def load_config(path: str) -> Config:
    """Read and validate the configuration file at `path`."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise ConfigError(f"config: {path}: cannot read: {err.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"config: {path}: not valid JSON: {err}") from None
    return parse_config(data)
