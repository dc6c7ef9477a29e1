"""The alert topic: each publisher (CloudWatch alarms, EventBridge rules) has exactly the grants AWS's
documentation names for it, on the topic's policy and on the key that encrypts the topic."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.unit.cdk_app import DEFAULT_RAW, Synthesized, default_app, multi_app, synthesize

CLOUDWATCH = "cloudwatch.amazonaws.com"
EVENTS = "events.amazonaws.com"
# What every Fn::Join of "this account's alarms in this region" renders to, tokens spelled out.
THIS_ACCOUNTS_ALARMS = "arn:${AWS::Partition}:cloudwatch:${AWS::Region}:${AWS::AccountId}:alarm:*"


@pytest.fixture(scope="module")
def app() -> Synthesized:
    return default_app()


@pytest.fixture(scope="module")
def network(app: Synthesized) -> dict[str, Any]:
    return app.template_json(app.network)


def rendered(value: Any) -> Any:
    """A template value with Fn::Join and the pseudo parameters written out as text, for comparison."""
    if isinstance(value, dict):
        if set(value) == {"Fn::Join"}:
            separator, parts = value["Fn::Join"]
            return separator.join(str(rendered(p)) for p in parts)
        if set(value) == {"Ref"} and str(value["Ref"]).startswith("AWS::"):
            return "${" + value["Ref"] + "}"
        return {k: rendered(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rendered(v) for v in value]
    return value


def _one(body: dict[str, Any], type_: str) -> tuple[str, dict[str, Any]]:
    (found,) = [(k, r) for k, r in body["Resources"].items() if r["Type"] == type_]
    return found


def topic_id(body: dict[str, Any]) -> str:
    return _one(body, "AWS::SNS::Topic")[0]


def topic_statements(body: dict[str, Any]) -> list[dict[str, Any]]:
    statements: list[dict[str, Any]] = _one(body, "AWS::SNS::TopicPolicy")[1]["Properties"]["PolicyDocument"][
        "Statement"
    ]
    return statements


def key_statements(body: dict[str, Any]) -> list[dict[str, Any]]:
    statements: list[dict[str, Any]] = _one(body, "AWS::KMS::Key")[1]["Properties"]["KeyPolicy"]["Statement"]
    return statements


def granted_to(statements: list[dict[str, Any]], service: str) -> list[dict[str, Any]]:
    """The Allow statements that name this service principal (alone or among others)."""
    found = []
    for statement in statements:
        principal = statement.get("Principal")
        services = principal.get("Service") if isinstance(principal, dict) else None
        names = services if isinstance(services, list) else [services]
        if statement["Effect"] == "Allow" and service in names:
            found.append(statement)
    return found


def without_sid(statement: dict[str, Any]) -> dict[str, Any]:
    return rendered({k: v for k, v in statement.items() if k != "Sid"})


def test_cloudwatch_alarms_of_this_account_may_publish_to_the_topic(network: dict[str, Any]) -> None:
    # aws-facts: alerts-topic-policy-replaces-default, alerts-cloudwatch-topic
    # The topic policy replaces the default one: without this statement every alarm action fails with
    # "... is not authorized to perform: SNS:Publish". Scoped, as the Knowledge Center shows, by
    # aws:SourceArn, here to every alarm of this account and region (they live in several stacks).
    (statement,) = granted_to(topic_statements(network), CLOUDWATCH)
    assert without_sid(statement) == {
        "Effect": "Allow",
        "Principal": {"Service": CLOUDWATCH},
        "Action": "sns:Publish",
        "Resource": {"Ref": topic_id(network)},
        "Condition": {"ArnLike": {"aws:SourceArn": THIS_ACCOUNTS_ALARMS}},
    }


def test_cloudwatch_alarms_of_this_account_may_use_the_topics_key(network: dict[str, Any]) -> None:
    # aws-facts: alerts-cloudwatch-key
    # SNS generates the data key for an encrypted topic on the publisher's behalf: the publisher needs
    # kms:GenerateDataKey* and kms:Decrypt on the key, nothing more; for CloudWatch, aws:SourceArn scopes it.
    (statement,) = granted_to(key_statements(network), CLOUDWATCH)
    assert without_sid(statement) == {
        "Effect": "Allow",
        "Principal": {"Service": CLOUDWATCH},
        "Action": ["kms:Decrypt", "kms:GenerateDataKey*"],
        "Resource": "*",
        "Condition": {"ArnLike": {"aws:SourceArn": THIS_ACCOUNTS_ALARMS}},
    }


def test_eventbridge_may_publish_to_the_topic_with_no_condition(network: dict[str, Any]) -> None:
    # aws-facts: alerts-eventbridge-topic
    # The EventBridge guide: no Condition block in an SNS topic policy for EventBridge; a statement with
    # one (aws:SourceAccount, as before) leaves the launch-failure rules unable to publish.
    (statement,) = granted_to(topic_statements(network), EVENTS)
    assert without_sid(statement) == {
        "Effect": "Allow",
        "Principal": {"Service": EVENTS},
        "Action": "sns:Publish",
        "Resource": {"Ref": topic_id(network)},
    }


def test_eventbridge_may_use_the_topics_key_without_source_conditions(network: dict[str, Any]) -> None:
    # aws-facts: alerts-eventbridge-key
    # The SNS guide's statement for an AWS service publishing to an encrypted topic, without the
    # aws:SourceAccount / aws:SourceArn keys that SNS does not support for EventBridge.
    (statement,) = granted_to(key_statements(network), EVENTS)
    assert without_sid(statement) == {
        "Effect": "Allow",
        "Principal": {"Service": EVENTS},
        "Action": ["kms:Decrypt", "kms:GenerateDataKey*"],
        "Resource": "*",
    }


def test_the_topic_still_refuses_publishing_without_tls(network: dict[str, Any]) -> None:
    # aws-facts: alerts-enforce-ssl
    # The one Deny (cdk-nag AwsSolutions-SNS3): AWS services publish over TLS, so it blocks no publisher.
    (deny,) = [s for s in topic_statements(network) if s["Effect"] == "Deny"]
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert deny["Action"] == "sns:Publish"


@pytest.mark.parametrize("which", ["default", "multi"])
def test_every_alarm_and_rule_publishes_to_the_topic_the_grants_cover(which: str) -> None:
    # aws-facts: alerts-cloudwatch-topic, alerts-eventbridge-topic, alerts-eventbridge-no-role
    # The NAT alarms (stacks/nat.py), the service alarms (stacks/healing_service.py) and the
    # launch-failure rules of both publish to this one topic: the grants above cover each of them. A rule
    # targets the topic with no RoleArn, so EventBridge uses the topic policy.
    built = default_app() if which == "default" else multi_app()
    network = built.template_json(built.network)
    topic = topic_id(network)
    export = f"PublishOutputRef{topic}"
    alarms = rules = 0
    for body in built.templates().values():
        for resource in body["Resources"].values():
            if resource["Type"] == "AWS::CloudWatch::Alarm":
                actions = resource["Properties"].get("AlarmActions", [])
                assert actions, resource["Properties"].get("AlarmDescription")
                for action in actions:
                    assert action == {"Ref": topic} or export in str(action), action
                alarms += 1
            elif resource["Type"] == "AWS::Events::Rule":
                for target in resource["Properties"]["Targets"]:
                    assert "RoleArn" not in target
                    assert target["Arn"] == {"Ref": topic} or export in str(target["Arn"]), target
                rules += 1
    # The NATs' status and in-service alarms, each service's two alarms; the NATs' and each service's rule.
    assert alarms >= 4 + 2 * len(built.stacks.services) and rules == 1 + len(built.stacks.services)


def test_a_teams_own_topic_gets_no_policy_and_no_key_grant_from_the_app() -> None:
    # aws-facts: alerts-own-topic
    # With alarm_topic_arn the team's topic and key are theirs: the app writes neither policy, so the
    # grants above are theirs to make (docs/configuration.md says which).
    raw = dict(DEFAULT_RAW, alarm_topic_arn="arn:aws:sns:ap-southeast-2:123456789012:oncall")
    with tempfile.TemporaryDirectory() as outdir:
        built = synthesize(raw, Path(outdir))
        network = built.template_json(built.network)
    types = {r["Type"] for r in network["Resources"].values()}
    assert "AWS::SNS::TopicPolicy" not in types
    assert not granted_to(key_statements(network), CLOUDWATCH)
    assert not granted_to(key_statements(network), EVENTS)
