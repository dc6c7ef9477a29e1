"""The configuration file: parsed and validated once, errors name the key."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
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

_REQUIRED = ("version", "region", "allocation_id", "nat_by_subnet")
_OPTIONAL = (
    "lifecycle_hook",
    "deadline_seconds",
    "ec2_endpoint_url",
    "autoscaling_endpoint_url",
    "imds_url",
)


@dataclass(frozen=True)
class LifecycleHook:
    auto_scaling_group: str
    hook: str


@dataclass(frozen=True)
class Config:
    version: int
    region: str
    allocation_id: str
    nat_by_subnet: Mapping[str, str]
    lifecycle_hook: Optional[LifecycleHook] = None
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS
    ec2_endpoint_url: Optional[str] = None
    autoscaling_endpoint_url: Optional[str] = None
    imds_url: str = DEFAULT_IMDS_URL

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


def _hook(value: Any) -> LifecycleHook:
    if not isinstance(value, dict):
        raise _fail("lifecycle_hook", f"expected an object, got {type(value).__name__}")
    for key in value:
        if key not in ("auto_scaling_group", "hook"):
            raise _fail(f"lifecycle_hook.{key}", "unknown key")
    for key in ("auto_scaling_group", "hook"):
        if key not in value:
            raise _fail(f"lifecycle_hook.{key}", "required key is missing")
    return LifecycleHook(
        auto_scaling_group=_string(
            "lifecycle_hook.auto_scaling_group", value["auto_scaling_group"], _HOOK_NAME, "a group name"
        ),
        hook=_string("lifecycle_hook.hook", value["hook"], _HOOK_NAME, "a hook name"),
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
    hook = data.get("lifecycle_hook")
    return Config(
        version=version,
        region=_string("region", data["region"], _REGION, "an AWS region name"),
        allocation_id=_string(
            "allocation_id",
            data["allocation_id"],
            _ALLOCATION_ID,
            "an allocation ID (eipalloc- and hex digits)",
        ),
        nat_by_subnet=_nat_map(data["nat_by_subnet"]),
        lifecycle_hook=None if hook is None else _hook(hook),
        deadline_seconds=_deadline(data.get("deadline_seconds", DEFAULT_DEADLINE_SECONDS)),
        ec2_endpoint_url=_optional_url("ec2_endpoint_url", data.get("ec2_endpoint_url")),
        autoscaling_endpoint_url=_optional_url(
            "autoscaling_endpoint_url", data.get("autoscaling_endpoint_url")
        ),
        imds_url=_string("imds_url", data.get("imds_url", DEFAULT_IMDS_URL), _URL, "an http(s) URL").rstrip(
            "/"
        ),
    )


def _optional_url(key: str, value: Any) -> Optional[str]:
    return None if value is None else _string(key, value, _URL, "an http(s) URL")


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
