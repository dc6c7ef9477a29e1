"""eip-reclaim as a CDK construct library: a public EC2 instance that heals itself and keeps its Elastic IP.

Installed from the wheel, this package is ``eip_reclaim``; in a checkout it is ``stacks/`` (and
``import eip_reclaim`` finds it through the small module of that name at the repository's top).

For a team's own app and VPC::

    nat = eip_reclaim.StableNatProvider()
    vpc = ec2.Vpc(stack, "Vpc", nat_gateway_provider=nat, ...)
    eip_reclaim.HealingService(stack, "Web", vpc=vpc, egress=eip_reclaim.Egress.stable_nat(nat))

For the whole app as ``cdk.json`` describes it: ``eip_reclaim.build(app, eip_reclaim.parse({...}))``.
Everything else in the package is internal and may change between minor versions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# The public surface; each name is imported on first use, so that the configuration and the payload
# bundle load without aws-cdk-lib (whose import starts Node.js and takes seconds).
_PUBLIC = {
    # One healing service in any VPC, and how it reaches the EC2 API before it holds its address.
    "HealingService": "service",
    "Egress": "service_network",
    # NAT instances at stable addresses for an ec2.Vpc (nat_gateway_provider=...).
    "StableNatProvider": "nat",
    # An alert topic (encrypted, with the policies alarms and EventBridge need) and a heals dashboard.
    "Alerts": "monitoring",
    # The app's own network and stacks, built from the typed configuration.
    "Network": "network",
    "NetworkStack": "network",
    "HealingServiceStack": "healing_service",
    "Stacks": "assembly",
    "build": "assembly",
    # The typed configuration (the cdk.json shape) and its parser.
    "AppConfig": "config",
    "NetworkConfig": "config",
    "ServiceConfig": "config",
    "HealthCheckConfig": "config",
    "ExistingSubnet": "config",
    "ConfigError": "config",
    "CONTEXT_KEY": "config",
    "parse": "config",
    "from_context": "config",
    # The payload bundle every service installs (built once per synth, cached).
    "BundleInfo": "bundle",
    "BundleError": "bundle",
    "build_bundle": "bundle",
}

__all__ = [
    "CONTEXT_KEY",
    "Alerts",
    "AppConfig",
    "BundleError",
    "BundleInfo",
    "ConfigError",
    "Egress",
    "ExistingSubnet",
    "HealingService",
    "HealingServiceStack",
    "HealthCheckConfig",
    "Network",
    "NetworkConfig",
    "NetworkStack",
    "ServiceConfig",
    "StableNatProvider",
    "Stacks",
    "__version__",
    "build",
    "build_bundle",
    "from_context",
    "parse",
]

if TYPE_CHECKING:
    from .assembly import Stacks, build
    from .bundle import BundleError, BundleInfo, build_bundle
    from .config import (
        CONTEXT_KEY,
        AppConfig,
        ConfigError,
        ExistingSubnet,
        HealthCheckConfig,
        NetworkConfig,
        ServiceConfig,
        from_context,
        parse,
    )
    from .healing_service import HealingServiceStack
    from .monitoring import Alerts
    from .nat import StableNatProvider
    from .network import Network, NetworkStack
    from .service import HealingService
    from .service_network import Egress


def __getattr__(name: str) -> object:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
