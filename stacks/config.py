"""The app's configuration: frozen, typed, validated once, with errors that name the key."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The context key in cdk.json (or `-c eip-reclaim='{...}'`) that holds the whole configuration.
CONTEXT_KEY = "eip-reclaim"

# A service name becomes part of stack names, the group name and a tag value: keep it DNS-label-like
# and short enough that "<prefix>-<name>" stays under CloudFormation's 128-character stack name limit.
_SERVICE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
_STACK_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,63}$")
# EC2 instance types: a family (letters, generation, attribute letters, "-flex"), a dot, a size.
_INSTANCE_TYPE = re.compile(r"^[a-z]+[0-9]+[a-z0-9-]*\.[a-z0-9]+$")
# Graviton families carry a "g" among the attribute letters after the generation digit (t4g, c7gn, m6gd).
_GRAVITON_FAMILY = re.compile(r"^[a-z]+[0-9]+[a-z]*g[a-z]*(-[a-z]+)?$")
# Allocation ids are "eipalloc-" and 8 (older) or 17 hex digits.
_ALLOCATION_ID = re.compile(r"^eipalloc-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
# The retention periods CloudWatch Logs accepts, in days.
_LOG_RETENTION_DAYS = frozenset(
    {1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653}
)
# No region offers a VPC more than six availability zones.
_MAX_AZS = 6
# The instance's python3 that the payload's dependencies are bundled for: Amazon Linux 2023's is 3.9,
# and the payload's code keeps to 3.9 (vermin in `make lint`), so nothing older.
DEFAULT_PAYLOAD_PYTHON = "3.9"
_PYTHON_VERSION = re.compile(r"^3\.(9|[1-9][0-9])$")
# Resource ids of a team's own VPC: a prefix and 8 (older) or 17 hex digits.
_VPC_ID = re.compile(r"^vpc-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
_SUBNET_ID = re.compile(r"^subnet-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
_ROUTE_TABLE_ID = re.compile(r"^rtb-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
# An availability zone's name: its region's name and a letter (us-east-1a), or a Local Zone's
# (us-west-2-lax-1a).
_AZ_NAME = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+[a-z]$")
# How the instance reaches the API before it holds its address (README, "Network choices").
EGRESS_NAT_INSTANCES = "nat-instances"
EGRESS_IPV6 = "ipv6"
EGRESS_INTERFACE_ENDPOINTS = "interface-endpoints"
EGRESS_CHOICES = (EGRESS_NAT_INSTANCES, EGRESS_IPV6, EGRESS_INTERFACE_ENDPOINTS)
# The payload's two NAT strategies (bootstrap/egress); the first is its default.
NAT_EGRESS_CHOICES = ("policy-route", "main-table")
# What a team's VPC may already have that the app would otherwise add: the S3 gateway endpoint (the
# user data fetches the payload through it) and the interface endpoints of the payload's four APIs. A
# second private-DNS endpoint for the same service would collide with the first.
INTERFACE_ENDPOINT_SERVICES = ("ec2", "autoscaling", "cloudformation", "monitoring")
ENDPOINT_NAMES = ("s3", *INTERFACE_ENDPOINT_SERVICES)
# The keys that describe a VPC the app creates; a team's own VPC is described by the others.
_NEW_VPC_KEYS = ("cidr", "az_count", "subnet_prefix_length")
# How a service's instance is replaced (deploys, health replacements): the design's group of exactly
# one instance, or a second one for the minutes of a handover (docs/deploy.md, "Choosing the handover").
HANDOVER_TERMINATE_FIRST = "terminate-first"
HANDOVER_LAUNCH_FIRST = "launch-first"
HANDOVER_CHOICES = (HANDOVER_TERMINATE_FIRST, HANDOVER_LAUNCH_FIRST)
# An absolute URL path without whitespace, as the payload's health_check.path accepts it.
_URL_PATH = re.compile(r"^/\S*$")
# An SNS topic ARN in any partition: arn:<partition>:sns:<region>:<12-digit account>:<name>.
_TOPIC_ARN = re.compile(r"^arn:aws[a-z-]*:sns:[a-z]{2}(-[a-z]+)+-\d+:\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?$")
# HTTPS's port: a health check with a path there speaks TLS unless told otherwise.
_HTTPS_PORT = 443


class ConfigError(ValueError):
    """A configuration value that cannot be used; `str()` is one line naming the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class ExistingSubnet:
    """A public subnet of a team's own VPC, as the configuration states it (no lookup at synth)."""

    subnet_id: str
    availability_zone: str
    cidr: str
    route_table_id: str


@dataclass(frozen=True)
class NetworkConfig:
    """The VPC that every healing service of this app shares: a new one, or a team's own (`vpc_id`)."""

    cidr: str = "10.0.0.0/16"
    az_count: int = 2
    subnet_prefix_length: int = 24
    nat_instance_type: str = "t4g.nano"
    flow_log_retention_days: int = 30
    egress: str = EGRESS_NAT_INSTANCES
    # The payload's strategy through the NATs (with egress nat-instances only).
    nat_egress: str = NAT_EGRESS_CHOICES[0]
    # A team's own VPC: its id, and (since nothing is looked up) what it has. `cidr` then holds the VPC's
    # primary IPv4 block and `az_count` the number of public subnets.
    vpc_id: str | None = None
    public_subnets: tuple[ExistingSubnet, ...] = ()
    existing_endpoints: frozenset[str] = frozenset()

    @property
    def nat_is_arm64(self) -> bool:
        return is_graviton(self.nat_instance_type)

    @property
    def uses_nat_instances(self) -> bool:
        return self.egress == EGRESS_NAT_INSTANCES

    @property
    def is_existing_vpc(self) -> bool:
        return self.vpc_id is not None

    @property
    def payload_egress(self) -> str:
        """The payload's `egress` for this network (bootstrap/egress)."""
        return self.nat_egress if self.uses_nat_instances else "direct"

    @property
    def payload_dualstack(self) -> bool:
        """True when the payload must call EC2 at its dual-stack endpoint (IPv6 is its only way out)."""
        return self.egress == EGRESS_IPV6

    @property
    def endpoints_to_add(self) -> tuple[str, ...]:
        """The interface endpoints the app creates: those of its APIs that the VPC does not have yet."""
        if self.egress != EGRESS_INTERFACE_ENDPOINTS:
            return ()
        return tuple(s for s in INTERFACE_ENDPOINT_SERVICES if s not in self.existing_endpoints)


@dataclass(frozen=True)
class HealthCheckConfig:
    """The watchdog's probe of the service on its instance (bootstrap/watchdog.py): the same shape as the
    payload configuration's `health_check`."""

    port: int
    # HTTP GET of this path (2xx/3xx is healthy); None: a TCP connect is the probe.
    path: str | None = None
    # Failed probes in a row (one every 10 s) before the instance reports itself unhealthy.
    failures: int = 3
    # No probe until the service has had this long since its instance took the address.
    grace_seconds: int = 60
    # The HTTP probe over TLS (certificate not verified: the probe asks whether the service answers,
    # not who it is); a path on port 443 without it would probe a TLS server in plain HTTP and fail.
    tls: bool = False


@dataclass(frozen=True)
class SpotConfig:
    """Spot capacity for a service: the instance types it may run on, all of one architecture."""

    instance_types: tuple[str, ...]


@dataclass(frozen=True)
class ServiceConfig:
    """One self-healing instance and the Elastic IP it keeps."""

    name: str
    instance_type: str = "t4g.micro"
    ingress_ports: tuple[int, ...] = (443,)
    ingress_cidr: str = "0.0.0.0/0"
    allocation_id: str | None = None
    root_volume_gib: int = 8
    # One stopped, pre-initialized instance beside the in-service one (docs/failover.md).
    warm_pool: bool = False
    # The watchdog: None leaves detection to EC2's status checks.
    health_check: HealthCheckConfig | None = None
    # terminate-first: exactly one instance, always; launch-first: a second one while one replaces another.
    handover: str = HANDOVER_TERMINATE_FIRST
    # Spot instead of on-demand (needs launch-first): None runs `instance_type` on demand.
    spot: SpotConfig | None = None

    @property
    def launch_type(self) -> str:
        """The launch template's instance type: the first Spot type with `spot`, else `instance_type`."""
        return self.spot.instance_types[0] if self.spot is not None else self.instance_type

    @property
    def is_arm64(self) -> bool:
        return is_graviton(self.launch_type)

    @property
    def launches_first(self) -> bool:
        return self.handover == HANDOVER_LAUNCH_FIRST

    @property
    def adopts_address(self) -> bool:
        """True when the service takes over an existing Elastic IP instead of creating one."""
        return self.allocation_id is not None


@dataclass(frozen=True)
class AppConfig:
    """Everything `app.py` needs to build the stacks."""

    stack_prefix: str
    network: NetworkConfig
    services: tuple[ServiceConfig, ...]
    payload_python_version: str = DEFAULT_PAYLOAD_PYTHON
    # The team's own SNS topic for the alarms; None: the app creates one (encrypted) in the network stack.
    alarm_topic_arn: str | None = None


def is_graviton(instance_type: str) -> bool:
    """True for an arm64 (Graviton) instance type, which needs an arm64 image."""
    return bool(_GRAVITON_FAMILY.match(instance_type.split(".", 1)[0]))


def from_context(value: object) -> AppConfig:
    """Build the configuration from the context value: an object (cdk.json) or a JSON string (`-c`)."""
    if value is None:
        raise ConfigError(CONTEXT_KEY, "missing from the CDK context (cdk.json holds the default)")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(CONTEXT_KEY, f"not valid JSON ({err.msg} at character {err.pos})") from None
    return parse(value)


def parse(raw: object) -> AppConfig:
    """Validate a decoded configuration object and return the frozen configuration."""
    top = _object(
        raw,
        CONTEXT_KEY,
        required=set(),
        optional={"stack_prefix", "network", "services", "payload_python_version", "alarm_topic_arn"},
    )
    prefix = _string(top.get("stack_prefix", "EipReclaim"), "stack_prefix")
    if not _STACK_PREFIX.match(prefix):
        raise ConfigError("stack_prefix", f"{prefix!r} must be a letter then up to 63 letters, digits or '-'")
    network = _network(top.get("network", {}))
    services_raw = top.get("services", [{"name": "web"}])
    if not isinstance(services_raw, list):
        raise ConfigError("services", f"expected a list of services, got {_kind(services_raw)}")
    if not services_raw:
        raise ConfigError("services", "at least one service is needed")
    services = tuple(_service(item, f"services[{i}]") for i, item in enumerate(services_raw))
    _unique([s.name for s in services], "services", "name")
    # Two services holding one address would take it from each other at every boot.
    _unique([s.allocation_id for s in services], "services", "allocation_id")
    _warm_pool_reaches_auto_scaling(network, services)
    python = _string(top.get("payload_python_version", DEFAULT_PAYLOAD_PYTHON), "payload_python_version")
    if not _PYTHON_VERSION.match(python):
        raise ConfigError(
            "payload_python_version",
            f"{python!r} must be the instance's python3 as major.minor, 3.9 or later (AL2023: 3.9)",
        )
    topic_arn = top.get("alarm_topic_arn")
    if topic_arn is not None:
        topic_arn = _string(topic_arn, "alarm_topic_arn")
        if not _TOPIC_ARN.match(topic_arn):
            raise ConfigError("alarm_topic_arn", f"{topic_arn!r} is not an SNS topic ARN")
    return AppConfig(
        stack_prefix=prefix,
        network=network,
        services=services,
        payload_python_version=python,
        alarm_topic_arn=topic_arn,
    )


def _network(raw: object) -> NetworkConfig:
    key = "network"
    fields = set(NetworkConfig.__dataclass_fields__) - {"public_subnets", "existing_endpoints"}
    obj = _object(
        raw, key, required=set(), optional=fields | {"vpc_cidr", "public_subnets", "existing_endpoints"}
    )
    default = NetworkConfig()
    egress = _choice(obj.get("egress", default.egress), f"{key}.egress", EGRESS_CHOICES)
    if egress != EGRESS_NAT_INSTANCES:
        # Keys that would silently do nothing are refused: the team meant something by them.
        for nat_only in ("nat_egress", "nat_instance_type"):
            if nat_only in obj:
                raise ConfigError(
                    f"{key}.{nat_only}",
                    f"applies only to network.egress {EGRESS_NAT_INSTANCES!r}, not {egress!r}: remove it",
                )
    nat_egress = _choice(obj.get("nat_egress", default.nat_egress), f"{key}.nat_egress", NAT_EGRESS_CHOICES)
    nat_type = _instance_type(
        obj.get("nat_instance_type", default.nat_instance_type), f"{key}.nat_instance_type"
    )
    retention = _integer(
        obj.get("flow_log_retention_days", default.flow_log_retention_days), f"{key}.flow_log_retention_days"
    )
    if retention not in _LOG_RETENTION_DAYS:
        raise ConfigError(
            f"{key}.flow_log_retention_days",
            f"{retention} is not a CloudWatch Logs retention period "
            f"({', '.join(map(str, sorted(_LOG_RETENTION_DAYS)))})",
        )
    common: dict[str, Any] = {
        "nat_instance_type": nat_type,
        "flow_log_retention_days": retention,
        "egress": egress,
        "nat_egress": nat_egress,
    }
    if "vpc_id" in obj:
        return _existing_vpc(obj, key, common)
    for byo_only in ("vpc_cidr", "public_subnets", "existing_endpoints"):
        if byo_only in obj:
            raise ConfigError(
                f"{key}.{byo_only}", "describes a team's own VPC: it applies only with network.vpc_id"
            )
    cidr = _cidr(obj.get("cidr", default.cidr), f"{key}.cidr")
    vpc = ipaddress.IPv4Network(cidr)
    if not 16 <= vpc.prefixlen <= 24:
        raise ConfigError(f"{key}.cidr", f"{cidr!r}: a VPC needs a prefix length from /16 to /24")
    az_count = _integer(obj.get("az_count", default.az_count), f"{key}.az_count")
    if not 2 <= az_count <= _MAX_AZS:
        raise ConfigError(
            f"{key}.az_count",
            f"{az_count}: needs 2 to {_MAX_AZS} availability zones (the group fails over between them)",
        )
    prefix = _integer(
        obj.get("subnet_prefix_length", default.subnet_prefix_length), f"{key}.subnet_prefix_length"
    )
    # /28 is the smallest subnet AWS allows; a subnet can be no larger than its share of the VPC.
    if not vpc.prefixlen < prefix <= 28:
        raise ConfigError(
            f"{key}.subnet_prefix_length", f"/{prefix} must lie between /{vpc.prefixlen + 1} and /28"
        )
    # A public and a private subnet per AZ.
    needed = 2 * az_count
    if needed > 2 ** (prefix - vpc.prefixlen):
        raise ConfigError(
            f"{key}.subnet_prefix_length",
            f"{needed} subnets of /{prefix} (a public and a private one per AZ) do not fit in {cidr}",
        )
    return NetworkConfig(cidr=cidr, az_count=az_count, subnet_prefix_length=prefix, **common)


def _existing_vpc(obj: Mapping[str, Any], key: str, common: dict[str, Any]) -> NetworkConfig:
    """A team's own VPC: what it is and has, stated in the configuration (nothing is looked up)."""
    for new_only in _NEW_VPC_KEYS:
        if new_only in obj:
            raise ConfigError(
                f"{key}.{new_only}",
                "describes a VPC the app creates: with network.vpc_id give network.vpc_cidr and "
                "network.public_subnets instead",
            )
    vpc_id = _string(obj["vpc_id"], f"{key}.vpc_id")
    if not _VPC_ID.match(vpc_id):
        raise ConfigError(f"{key}.vpc_id", f"{vpc_id!r} is not a VPC id (vpc- and 8 or 17 hex digits)")
    if "vpc_cidr" not in obj:
        raise ConfigError(f"{key}.vpc_cidr", "required with network.vpc_id (the VPC's primary IPv4 block)")
    vpc_cidr = _cidr(obj["vpc_cidr"], f"{key}.vpc_cidr")
    if not 16 <= ipaddress.IPv4Network(vpc_cidr).prefixlen <= 28:
        raise ConfigError(f"{key}.vpc_cidr", f"{vpc_cidr!r}: a VPC's block is /16 to /28")
    subnets_raw = obj.get("public_subnets")
    if subnets_raw is None:
        raise ConfigError(
            f"{key}.public_subnets", "required with network.vpc_id (one public subnet per AZ to use)"
        )
    if not isinstance(subnets_raw, list):
        raise ConfigError(f"{key}.public_subnets", f"expected a list of subnets, got {_kind(subnets_raw)}")
    if not 2 <= len(subnets_raw) <= _MAX_AZS:
        raise ConfigError(
            f"{key}.public_subnets",
            f"{len(subnets_raw)} subnets: needs 2 to {_MAX_AZS}, one per availability zone "
            "(the group fails over between them)",
        )
    subnets = tuple(
        _existing_subnet(item, f"{key}.public_subnets[{i}]", vpc_cidr) for i, item in enumerate(subnets_raw)
    )
    _unique([s.subnet_id for s in subnets], f"{key}.public_subnets", "subnet_id")
    # One subnet per AZ: the NATs and the interface endpoints have one place per AZ.
    _unique([s.availability_zone for s in subnets], f"{key}.public_subnets", "availability_zone")
    endpoints_raw = obj.get("existing_endpoints", [])
    if not isinstance(endpoints_raw, list):
        raise ConfigError(
            f"{key}.existing_endpoints", f"expected a list of endpoint names, got {_kind(endpoints_raw)}"
        )
    endpoints = [
        _choice(e, f"{key}.existing_endpoints[{i}]", ENDPOINT_NAMES) for i, e in enumerate(endpoints_raw)
    ]
    _unique(endpoints, f"{key}.existing_endpoints", None)
    return NetworkConfig(
        cidr=vpc_cidr,
        az_count=len(subnets),
        vpc_id=vpc_id,
        public_subnets=subnets,
        existing_endpoints=frozenset(endpoints),
        **common,
    )


def _existing_subnet(raw: object, key: str, vpc_cidr: str) -> ExistingSubnet:
    fields = set(ExistingSubnet.__dataclass_fields__)
    obj = _object(raw, key, required=fields, optional=set())
    subnet_id = _string(obj["subnet_id"], f"{key}.subnet_id")
    if not _SUBNET_ID.match(subnet_id):
        raise ConfigError(
            f"{key}.subnet_id", f"{subnet_id!r} is not a subnet id (subnet- and 8 or 17 hex digits)"
        )
    zone = _string(obj["availability_zone"], f"{key}.availability_zone")
    if not _AZ_NAME.match(zone):
        raise ConfigError(f"{key}.availability_zone", f"{zone!r} is not an availability zone name")
    cidr = _cidr(obj["cidr"], f"{key}.cidr")
    if not ipaddress.IPv4Network(cidr).subnet_of(ipaddress.IPv4Network(vpc_cidr)):
        raise ConfigError(f"{key}.cidr", f"{cidr} does not lie in network.vpc_cidr {vpc_cidr}")
    if ipaddress.IPv4Network(cidr).prefixlen > 28:
        raise ConfigError(f"{key}.cidr", f"{cidr}: AWS subnets are /28 or larger")
    route_table = _string(obj["route_table_id"], f"{key}.route_table_id")
    if not _ROUTE_TABLE_ID.match(route_table):
        raise ConfigError(
            f"{key}.route_table_id", f"{route_table!r} is not a route table id (rtb- and 8 or 17 hex digits)"
        )
    return ExistingSubnet(subnet_id=subnet_id, availability_zone=zone, cidr=cidr, route_table_id=route_table)


def _service(raw: object, key: str) -> ServiceConfig:
    fields = set(ServiceConfig.__dataclass_fields__)
    obj = _object(raw, key, required={"name"}, optional=fields - {"name"})
    name = _string(obj["name"], f"{key}.name")
    if not _SERVICE_NAME.match(name):
        raise ConfigError(
            f"{key}.name", f"{name!r} must be 1-32 lowercase letters, digits or '-', starting with a letter"
        )
    default = ServiceConfig(name=name)
    instance_type = _instance_type(obj.get("instance_type", default.instance_type), f"{key}.instance_type")
    ports_raw = obj.get("ingress_ports", list(default.ingress_ports))
    if not isinstance(ports_raw, list):
        raise ConfigError(f"{key}.ingress_ports", f"expected a list of TCP ports, got {_kind(ports_raw)}")
    ports = tuple(_port(p, f"{key}.ingress_ports[{i}]") for i, p in enumerate(ports_raw))
    _unique(list(ports), f"{key}.ingress_ports", None)
    ingress_cidr = _cidr(obj.get("ingress_cidr", default.ingress_cidr), f"{key}.ingress_cidr")
    allocation_id = obj.get("allocation_id")
    if allocation_id is not None:
        allocation_id = _string(allocation_id, f"{key}.allocation_id")
        if not _ALLOCATION_ID.match(allocation_id):
            raise ConfigError(
                f"{key}.allocation_id",
                f"{allocation_id!r} is not an allocation id (eipalloc- and 8 or 17 hex digits)",
            )
    root = _integer(obj.get("root_volume_gib", default.root_volume_gib), f"{key}.root_volume_gib")
    # Amazon Linux 2023's image needs 2 GiB; 16 TiB is gp3's ceiling.
    if not 2 <= root <= 16384:
        raise ConfigError(f"{key}.root_volume_gib", f"{root} must be from 2 to 16384 GiB")
    warm_pool = _boolean(obj.get("warm_pool", default.warm_pool), f"{key}.warm_pool")
    health_raw = obj.get("health_check")
    health = None if health_raw is None else _health_check(health_raw, f"{key}.health_check")
    handover = _choice(obj.get("handover", default.handover), f"{key}.handover", HANDOVER_CHOICES)
    spot = None if obj.get("spot") is None else _spot(obj, key, handover=handover, warm_pool=warm_pool)
    return ServiceConfig(
        name=name,
        instance_type=instance_type,
        ingress_ports=ports,
        ingress_cidr=ingress_cidr,
        allocation_id=allocation_id,
        root_volume_gib=root,
        warm_pool=warm_pool,
        health_check=health,
        handover=handover,
        spot=spot,
    )


def _spot(obj: Mapping[str, Any], key: str, *, handover: str, warm_pool: bool) -> SpotConfig:
    """`spot`: two or more instance types of one architecture, for a launch-first group without a pool."""
    spot_key = f"{key}.spot"
    raw = _object(obj["spot"], spot_key, required={"instance_types"}, optional=set())
    if handover != HANDOVER_LAUNCH_FIRST:
        raise ConfigError(
            spot_key,
            f'requires {key}.handover "{HANDOVER_LAUNCH_FIRST}" (Capacity Rebalancing launches the '
            "replacement before the interrupted instance goes)",
        )
    if warm_pool:
        raise ConfigError(
            spot_key, "not with warm_pool: Auto Scaling has no warm pool for Spot or mixed instances"
        )
    if "instance_type" in obj:
        raise ConfigError(
            f"{key}.instance_type", f"with spot the instance types are {spot_key}.instance_types: remove it"
        )
    types_key = f"{spot_key}.instance_types"
    types_raw = raw["instance_types"]
    if not isinstance(types_raw, list):
        raise ConfigError(types_key, f"expected a list of instance types, got {_kind(types_raw)}")
    if len(types_raw) < 2:
        raise ConfigError(
            types_key,
            f"{len(types_raw)} type(s): give two or more, so a Spot shortage of one type is not an outage",
        )
    types = tuple(_instance_type(t, f"{types_key}[{i}]") for i, t in enumerate(types_raw))
    _unique(list(types), types_key, None)
    for i, instance_type in enumerate(types):
        if is_graviton(instance_type) != is_graviton(types[0]):
            raise ConfigError(
                f"{types_key}[{i}]",
                f"{instance_type!r} is not of {types[0]!r}'s architecture: one image serves every type "
                "(all arm64 or all x86_64)",
            )
    return SpotConfig(instance_types=types)


def _health_check(raw: object, key: str) -> HealthCheckConfig:
    fields = set(HealthCheckConfig.__dataclass_fields__)
    obj = _object(raw, key, required={"port"}, optional=fields - {"port"})
    default = HealthCheckConfig(port=1)
    port = _port(obj["port"], f"{key}.port")
    path = obj.get("path")
    if path is not None:
        path = _string(path, f"{key}.path")
        if not _URL_PATH.match(path):
            raise ConfigError(f"{key}.path", f"{path!r} is not an absolute URL path (starting with /)")
    # The payload's own bounds (bootstrap/config.py), so the instance never refuses what synth accepted.
    failures = _integer(obj.get("failures", default.failures), f"{key}.failures")
    if not 1 <= failures <= 100:
        raise ConfigError(f"{key}.failures", f"{failures} must be from 1 to 100")
    grace = _integer(obj.get("grace_seconds", default.grace_seconds), f"{key}.grace_seconds")
    if not 0 <= grace <= 3600:
        raise ConfigError(f"{key}.grace_seconds", f"{grace} must be from 0 to 3600 seconds")
    tls = _boolean(obj.get("tls", default.tls), f"{key}.tls")
    if tls and path is None:
        raise ConfigError(f"{key}.tls", "applies to the HTTP probe: give a path as well")
    if path is not None and port == _HTTPS_PORT and not tls:
        raise ConfigError(
            f"{key}.tls",
            f'a path on port {_HTTPS_PORT} is probed in plain HTTP unless "tls": true (a TLS server fails '
            "every such probe and its instance is replaced in a loop)",
        )
    return HealthCheckConfig(port=port, path=path, failures=failures, grace_seconds=grace, tls=tls)


def _warm_pool_reaches_auto_scaling(network: NetworkConfig, services: Sequence[ServiceConfig]) -> None:
    """A warming instance completes its launch action before it holds any address: on an IPv6-only
    egress it has no way to Auto Scaling (no dual-stack endpoint), and the hook would abandon it."""
    if network.egress != EGRESS_IPV6:
        return
    for i, service in enumerate(services):
        if service.warm_pool:
            raise ConfigError(
                f"services[{i}].warm_pool",
                'not with network.egress "ipv6": a warming instance has no way to Auto Scaling '
                "(no IPv6 endpoint) to complete its launch",
            )


def _object(raw: object, key: str, *, required: set[str], optional: set[str]) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(key, f"expected an object, got {_kind(raw)}")
    unknown = sorted(set(raw) - required - optional)
    if unknown:
        allowed = ", ".join(sorted(required | optional))
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown key (allowed here: {allowed})")
    missing = sorted(required - set(raw))
    if missing:
        raise ConfigError(f"{key}.{missing[0]}", "required key is missing")
    return raw


def _string(raw: object, key: str) -> str:
    if not isinstance(raw, str):
        raise ConfigError(key, f"expected a string, got {_kind(raw)}")
    return raw


def _integer(raw: object, key: str) -> int:
    # JSON has no separate boolean-free integer type: true would pass isinstance(..., int).
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(key, f"expected an integer, got {_kind(raw)}")
    return raw


def _boolean(raw: object, key: str) -> bool:
    if not isinstance(raw, bool):
        raise ConfigError(key, f"expected true or false, got {_kind(raw)}")
    return raw


def _cidr(raw: object, key: str) -> str:
    text = _string(raw, key)
    try:
        network = ipaddress.IPv4Network(text, strict=True)
    except ValueError as err:
        raise ConfigError(key, f"{text!r} is not an IPv4 CIDR block ({err})") from None
    if "/" not in text:
        raise ConfigError(key, f"{text!r} is not an IPv4 CIDR block (no prefix length)")
    return str(network)


def _choice(raw: object, key: str, choices: Sequence[str]) -> str:
    text = _string(raw, key)
    if text not in choices:
        raise ConfigError(key, f"{text!r} is not one of {', '.join(repr(c) for c in choices)}")
    return text


def _port(raw: object, key: str) -> int:
    port = _integer(raw, key)
    if not 1 <= port <= 65535:
        raise ConfigError(key, f"{port} is not a TCP port (1-65535)")
    return port


def _instance_type(raw: object, key: str) -> str:
    text = _string(raw, key)
    if not _INSTANCE_TYPE.match(text):
        raise ConfigError(key, f"{text!r} is not an EC2 instance type like 't4g.micro'")
    return text


def _unique(values: Sequence[object], key: str, field: str | None) -> None:
    seen: set[object] = set()
    for i, value in enumerate(values):
        if value is None:
            continue
        if value in seen:
            where = f"{key}[{i}].{field}" if field else f"{key}[{i}]"
            raise ConfigError(where, f"{value!r} appears more than once")
        seen.add(value)


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)
