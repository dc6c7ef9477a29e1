"""What a platform team subscribes to: one topic per app, the alarms that publish to it, a dashboard."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Aws, Duration, RemovalPolicy
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_events as events
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from constructs import Construct

from .nat import in_service_alarm

# The payload's CloudWatch namespace and its metrics (docs/payload.md): written by the payload with the
# dimension Service=<service name>.
METRICS_NAMESPACE = "EipReclaim"
HEALED = "Healed"
HEAL_SECONDS = "HealSeconds"
ABANDONED = "Abandoned"
# Auto Scaling's event when a group cannot launch an instance (capacity, a broken launch template).
LAUNCH_UNSUCCESSFUL = "EC2 Instance Launch Unsuccessful"


class Alerts(Construct):
    """The app's key (flow logs, the topic), its alert topic (or the team's own), and the heals dashboard."""

    def __init__(self, scope: Construct, construct_id: str, *, topic_arn: str | None) -> None:
        super().__init__(scope, construct_id)
        self.key = kms.Key(
            self,
            "Key",
            description="eip-reclaim: encrypts the VPC flow logs and the alert topic",
            enable_key_rotation=True,
            # Flow logs kept after the stack goes stay readable only while their key exists.
            removal_policy=RemovalPolicy.RETAIN,
        )
        # CloudWatch Logs encrypts the flow-log group with it, only for log groups of this account.
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchLogsEncryptsThisAccountsLogGroups",
                principals=[iam.ServicePrincipal(f"logs.{Aws.REGION}.amazonaws.com")],
                actions=[
                    "kms:Encrypt*",
                    "kms:Decrypt*",
                    "kms:ReEncrypt*",
                    "kms:GenerateDataKey*",
                    "kms:Describe*",
                ],
                resources=["*"],
                conditions={
                    "ArnLike": {
                        "kms:EncryptionContext:aws:logs:arn": (
                            f"arn:{Aws.PARTITION}:logs:{Aws.REGION}:{Aws.ACCOUNT_ID}:log-group:*"
                        )
                    }
                },
            )
        )
        self.topic: sns.ITopic
        if topic_arn is not None:
            # The team's own topic: its policy and key must already admit both publishers as below
            # (docs/configuration.md, `alarm_topic_arn`).
            self.topic = sns.Topic.from_topic_arn(self, "Topic", topic_arn)
        else:
            topic = sns.Topic(
                self, "Topic", display_name="eip-reclaim alerts", master_key=self.key, enforce_ssl=True
            )
            # The topic policy CloudFormation writes replaces the topic's default one, which is what
            # lets same-account publishers in: each publisher needs its own statement here, and on the
            # key, since SNS generates the data key on the publisher's behalf (docs/aws-facts.md,
            # section "Alerts").
            for statement in publisher_topic_statements(topic.topic_arn):
                topic.add_to_resource_policy(statement)
            for statement in publisher_key_statements():
                self.key.add_to_resource_policy(statement)
            self.topic = topic
        self.dashboard = cloudwatch.Dashboard(self, "Dashboard", default_interval=Duration.days(7))
        # SEARCH finds every service's series, including services added after this stack was deployed.
        self.dashboard.add_widgets(
            _search_graph("Heals per hour, per service", HEALED, "Sum", left_label="heals"),
            _search_graph(
                "Heal time (boot to address), per service", HEAL_SECONDS, "Maximum", left_label="s"
            ),
            _search_graph("Abandoned launches, per service", ABANDONED, "Sum", left_label="abandoned"),
        )


def this_accounts_alarms() -> str:
    """Every CloudWatch alarm of this account in this region: the alarms live in several stacks (the
    network's NATs, each service), some deployed after the topic, so no list of alarm ARNs can name them."""
    return f"arn:{Aws.PARTITION}:cloudwatch:{Aws.REGION}:{Aws.ACCOUNT_ID}:alarm:*"


def publisher_topic_statements(topic_arn: str) -> list[iam.PolicyStatement]:
    """The topic policy's grants to the two publishers: CloudWatch alarms of this account (aws-facts:
    alerts-cloudwatch-topic) and EventBridge rules, whose statement must carry no Condition at all
    (aws-facts: alerts-eventbridge-topic)."""
    return [
        iam.PolicyStatement(
            sid="CloudWatchAlarmsOfThisAccount",
            principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
            actions=["sns:Publish"],
            resources=[topic_arn],
            conditions={"ArnLike": {"aws:SourceArn": this_accounts_alarms()}},
        ),
        iam.PolicyStatement(
            sid="EventBridgeRules",
            principals=[iam.ServicePrincipal("events.amazonaws.com")],
            actions=["sns:Publish"],
            resources=[topic_arn],
        ),
    ]


def publisher_key_statements() -> list[iam.PolicyStatement]:
    """The key policy's grants that let SNS encrypt what each publisher sends: CloudWatch scoped to this
    account's alarms (aws-facts: alerts-cloudwatch-key); EventBridge exactly as the SNS guide gives it,
    without aws:SourceAccount or aws:SourceArn, which SNS does not support for EventBridge (aws-facts:
    alerts-eventbridge-key)."""
    actions = ["kms:Decrypt", "kms:GenerateDataKey*"]
    return [
        iam.PolicyStatement(
            sid="CloudWatchAlarmsOfThisAccountPublish",
            principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
            actions=actions,
            resources=["*"],
            conditions={"ArnLike": {"aws:SourceArn": this_accounts_alarms()}},
        ),
        iam.PolicyStatement(
            sid="EventBridgeRulesPublish",
            principals=[iam.ServicePrincipal("events.amazonaws.com")],
            actions=actions,
            resources=["*"],
        ),
    ]


def _search_graph(title: str, metric: str, statistic: str, *, left_label: str) -> cloudwatch.GraphWidget:
    return cloudwatch.GraphWidget(
        title=title,
        width=8,
        left=[
            cloudwatch.MathExpression(
                expression=(
                    f"SEARCH('{{{METRICS_NAMESPACE},Service}} MetricName=\"{metric}\"', '{statistic}', 3600)"
                ),
                using_metrics={},
                label="",
                period=Duration.hours(1),
            )
        ],
        left_y_axis=cloudwatch.YAxisProps(label=left_label, show_units=False, min=0),
    )


def launch_failure_rule(
    scope: Construct, construct_id: str, *, group_names: Sequence[str], topic: sns.ITopic
) -> events.CfnRule:
    """Auto Scaling's failed launches of these groups, to the topic (escape hatch: an L1 rule targets the
    topic by ARN, so the topic's policy needs no statement per rule and the stacks no reference back)."""
    return events.CfnRule(
        scope,
        construct_id,
        description="eip-reclaim: a group of one could not launch its instance",
        event_pattern={
            "source": ["aws.autoscaling"],
            "detail-type": [LAUNCH_UNSUCCESSFUL],
            "detail": {"AutoScalingGroupName": list(group_names)},
        },
        state="ENABLED",
        targets=[events.CfnRule.TargetProperty(arn=topic.topic_arn, id="AlertTopic")],
    )


class ServiceAlarms(Construct):
    """A service's alarms: no instance in service, a launch abandoned by the payload, failed launches."""

    def __init__(
        self, scope: Construct, construct_id: str, *, service: str, group_name: str, topic: sns.ITopic
    ) -> None:
        super().__init__(scope, construct_id)
        self.no_instance = in_service_alarm(
            self, "NoInstanceInService", group_name=group_name, what=f"service {service}", topic=topic
        )
        self.abandoned = cloudwatch.Metric(
            namespace=METRICS_NAMESPACE,
            metric_name=ABANDONED,
            dimensions_map={"Service": service},
            statistic="Sum",
            period=Duration.minutes(5),
        ).create_alarm(
            self,
            "Abandoned",
            evaluation_periods=1,
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            # Quiet is good news: the payload publishes only when it abandons.
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            alarm_description=(
                f"Service {service}: an instance could not take the Elastic IP and was abandoned "
                "(README: runbook)"
            ),
        )
        self.abandoned.add_alarm_action(cloudwatch_actions.SnsAction(topic))
        self.launch_failures = launch_failure_rule(
            self, "LaunchFailed", group_names=[group_name], topic=topic
        )
