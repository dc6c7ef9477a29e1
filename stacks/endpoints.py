"""Interface endpoints for the APIs the payload calls, so an instance without a public IPv4 reaches them."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import aws_ec2 as ec2
from constructs import Construct

# The payload's API calls by the endpoint service that answers them: EC2 (describe, associate), Auto
# Scaling (the lifecycle action), CloudFormation (SignalResource) and CloudWatch (PutMetricData).
SERVICES = {
    "ec2": ec2.InterfaceVpcEndpointAwsService.EC2,
    "autoscaling": ec2.InterfaceVpcEndpointAwsService.AUTOSCALING,
    "cloudformation": ec2.InterfaceVpcEndpointAwsService.CLOUDFORMATION,
    "monitoring": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_MONITORING,
}
HTTPS = 443


class ApiEndpoints(Construct):
    """One interface endpoint per named service in the given subnets (one per AZ), with private DNS, so
    that the APIs' usual names resolve to addresses in the VPC; a security group admits HTTPS from the
    VPC's own block and nothing else.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        vpc: ec2.IVpc,
        vpc_cidr: str,
        subnets: Sequence[ec2.ISubnet],
        services: Sequence[str],
    ) -> None:
        super().__init__(scope, construct_id)
        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=vpc,
            description="eip-reclaim API endpoints: HTTPS from the VPC own addresses only",
            # An endpoint answers; it never opens a connection.
            allow_all_outbound=False,
        )
        self.security_group.add_ingress_rule(
            ec2.Peer.ipv4(vpc_cidr), ec2.Port.tcp(HTTPS), "API calls from inside the VPC"
        )
        self.endpoints: dict[str, ec2.InterfaceVpcEndpoint] = {}
        for name in services:
            self.endpoints[name] = ec2.InterfaceVpcEndpoint(
                self,
                name.capitalize(),
                vpc=vpc,
                service=SERVICES[name],
                subnets=ec2.SubnetSelection(subnets=list(subnets)),
                # The payload calls the APIs by their usual names: private DNS makes those names the
                # endpoint's. A second private-DNS endpoint for the same service in this VPC would
                # collide, hence network.existing_endpoints.
                private_dns_enabled=True,
                security_groups=[self.security_group],
                # The group above is the endpoint's only rule; `open` would add a second, identical one.
                open=False,
            )
