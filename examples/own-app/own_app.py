#!/usr/bin/env python3
"""A team's own CDK app that uses eip-reclaim as a library: its stack, its VPC, two healing services.

Nothing here comes from the eip-reclaim repository but the installed package (the wheel `pip wheel .`
builds there). Synthesize with `cdk synth` in this directory (cdk.json runs this file); in a checkout of
eip-reclaim without the wheel installed, `PYTHONPATH=../.. cdk synth` finds the library.
"""

from __future__ import annotations

from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

import eip_reclaim


class PublicServicesStack(cdk.Stack):
    """The team's VPC with NAT instances at stable addresses, a web server and a mail relay behind it."""

    def __init__(self, scope: Construct, construct_id: str, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, **kwargs)
        # One topic for every alarm here: the NATs' and both services'.
        alerts = eip_reclaim.Alerts(self, "Alerts", topic_arn=None)
        nat = eip_reclaim.StableNatProvider(topic=alerts.topic)
        vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr("10.40.0.0/16"),
            max_azs=2,
            nat_gateway_provider=nat,
            subnet_configuration=[
                # Public subnets without automatic public IPv4s: the NATs ask for one, the healing
                # instances must boot without one.
                ec2.SubnetConfiguration(
                    name="Public", subnet_type=ec2.SubnetType.PUBLIC, map_public_ip_on_launch=False
                ),
                ec2.SubnetConfiguration(name="Private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            ],
            # The instances fetch their payload from S3 before they hold any address.
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)
            },
            # Restricting the default security group takes a Lambda-backed custom resource; nothing here
            # uses that group.
            restrict_default_security_group=False,
        )
        vpc.add_flow_log("FlowLog")
        egress = eip_reclaim.Egress.stable_nat(nat)
        web = eip_reclaim.HealingService(
            self,
            "Web",
            vpc=vpc,
            egress=egress,
            ingress_ports=[80, 443],
            health_check=eip_reclaim.HealthCheckConfig(port=80, path="/"),
            alert_topic=alerts.topic,
        )
        mail = eip_reclaim.HealingService(
            self,
            "Mail",
            vpc=vpc,
            egress=egress,
            instance_type="t4g.small",
            ingress_ports=[25],
            ingress_cidr="192.0.2.0/24",
            alert_topic=alerts.topic,
        )
        for service in (web, mail):
            cdk.CfnOutput(self, f"{service.node.id}Address", value=service.public_ip or service.allocation_id)


def main() -> None:
    app = cdk.App()
    # Environment-agnostic: the same template for every account and region (docs/ci.md).
    PublicServicesStack(app, "TeamPublicServices")
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app, verbose=True))
    app.synth()


if __name__ == "__main__":
    main()
