"""The payload's configuration file (docs/payload.md, "Configuration"), built from the stacks' constructs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aws_cdk import Aws
from aws_cdk import aws_ec2 as ec2

from .config import HealthCheckConfig
from .monitoring import METRICS_NAMESPACE

CONFIG_VERSION = 1
# The payload's own deadline for one run; the lifecycle hook's heartbeat must outlast it.
DEADLINE_SECONDS = 240
# The payload's egress that changes nothing on the host (no NAT, so no subnet→NAT map).
DIRECT = "direct"


def payload_config(
    *,
    allocation_id: str,
    egress: str,
    dualstack: bool,
    nat_by_subnet: Sequence[tuple[ec2.ISubnet, str]],
    auto_scaling_group: str,
    lifecycle_hook: str,
    hook_timeout_seconds: int,
    stack_name: str,
    group_logical_id: str,
    service: str,
    health_check: HealthCheckConfig | None = None,
) -> dict[str, Any]:
    """The file's content. Subnet ids, the region and the allocation id may be CloudFormation tokens:
    `Stack.to_json_string` renders them, keys included, as one Fn::Join resolved at deploy.

    `egress` is the payload's strategy (bootstrap/egress), always written even where it is the
    payload's default; `nat_by_subnet` goes with the NAT strategies only, `dualstack` only when true.
    """
    config: dict[str, Any] = {
        "version": CONFIG_VERSION,
        "region": Aws.REGION,
        "allocation_id": allocation_id,
        "egress": egress,
    }
    if dualstack:
        config["dualstack"] = True
    if egress != DIRECT:
        config["nat_by_subnet"] = {subnet.subnet_id: nat_ip for subnet, nat_ip in nat_by_subnet}
    config |= {
        "lifecycle_hook": {
            "auto_scaling_group": auto_scaling_group,
            "hook": lifecycle_hook,
            # The payload decides from it whether another attempt still fits before it abandons.
            "timeout_seconds": hook_timeout_seconds,
        },
        # SUCCESS after CONTINUE, FAILURE on ABANDON: a deploy waits for it (creation/update policy).
        "signal": {"stack": stack_name, "resource": group_logical_id},
        "metrics": {"namespace": METRICS_NAMESPACE, "service": service},
        "deadline_seconds": DEADLINE_SECONDS,
    }
    if health_check is not None:
        # The watchdog's probe (bootstrap/watchdog.py); every value written out, the path only if set.
        probe: dict[str, Any] = {"port": health_check.port}
        if health_check.path is not None:
            probe["path"] = health_check.path
        probe["failures"] = health_check.failures
        probe["grace_seconds"] = health_check.grace_seconds
        if health_check.tls:
            # Only when true: a payload that predates TLS probes keeps accepting every other probe.
            probe["tls"] = True
        config["health_check"] = probe
    return config
