"""Builds every stack of the app from one configuration; `app.py` and the tests both call `build`."""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Stage, Tags, Validations
from cdk_nag import AwsSolutionsChecks

from . import nag
from .bundle import BundleInfo, build_bundle
from .config import EGRESS_INTERFACE_ENDPOINTS, EGRESS_IPV6, EGRESS_NAT_INSTANCES, AppConfig
from .healing_service import HealingServiceStack
from .network import NetworkStack

NETWORK_DESCRIPTIONS = {
    EGRESS_NAT_INSTANCES: (
        "eip-reclaim: VPC, NAT instances at stable addresses, S3 endpoint, flow logs, alerts"
    ),
    EGRESS_IPV6: "eip-reclaim: dual-stack VPC (IPv6 egress, no NAT), S3 endpoint, flow logs, alerts",
    EGRESS_INTERFACE_ENDPOINTS: (
        "eip-reclaim: VPC, API interface endpoints (no NAT), S3 endpoint, flow logs, alerts"
    ),
}


@dataclass(frozen=True)
class Stacks:
    network: NetworkStack
    services: tuple[HealingServiceStack, ...]
    bundle: BundleInfo


def build(app: Stage, config: AppConfig, *, checks: bool = True, bundle: BundleInfo | None = None) -> Stacks:
    """Add the network stack and one stack per service to `app` (an App, or a Stage of a pipeline, which
    prefixes the stacks' names with its own); with `checks`, cdk-nag runs on `app` at synth.

    Every service installs the same payload `bundle`; when none is given, it is built (or taken from the
    cache under build/) once, for `config.payload_python_version`. May raise `stacks.bundle.BundleError`.
    """
    if bundle is None:
        bundle = build_bundle(python_version=config.payload_python_version)
    network = NetworkStack(
        app,
        f"{config.stack_prefix}-Network",
        config=config.network,
        alarm_topic_arn=config.alarm_topic_arn,
        description=NETWORK_DESCRIPTIONS[config.network.egress],
    )
    services = []
    for service in config.services:
        stack = HealingServiceStack(
            app,
            f"{config.stack_prefix}-{service.name}",
            config=service,
            network=network.network,
            bundle=bundle,
            description=f"eip-reclaim: the self-healing instance '{service.name}' and its Elastic IP",
        )
        services.append(stack)
    built = Stacks(network=network, services=tuple(services), bundle=bundle)
    Tags.of(app).add("eip-reclaim:app", config.stack_prefix)
    # Acknowledgements only annotate the constructs: always, so that an app that runs cdk-nag itself (a
    # pipeline's, once at its root) sees them too.
    nag.acknowledge(built.network, built.services)
    if checks:
        Validations.of(app).add_plugins(AwsSolutionsChecks(app, verbose=True))
    return built
