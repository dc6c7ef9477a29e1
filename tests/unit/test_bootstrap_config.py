"""Configuration: every bad file is exit 2 with one line naming the key, before any route is touched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bootstrap.config import ConfigError, load_config, parse_config
from tests.unit.test_bootstrap_fakes import Rig

GOOD: dict[str, Any] = {
    "version": 1,
    "region": "ap-southeast-2",
    "allocation_id": "eipalloc-0123456789abcdef0",
    "nat_by_subnet": {"subnet-0aaa": "10.0.0.4", "subnet-0bbb": "10.0.1.4"},
    "lifecycle_hook": {"auto_scaling_group": "svc-asg", "hook": "svc-launch"},
    "deadline_seconds": 240,
}


def _with(**changes: Any) -> dict[str, Any]:
    document = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is _DROP:
            del document[key]
        else:
            document[key] = value
    return document


_DROP = object()


def test_the_design_example_is_valid() -> None:
    config = parse_config(GOOD)
    assert config.nat_for("subnet-0bbb") == "10.0.1.4"
    assert config.lifecycle_hook is not None and config.lifecycle_hook.hook == "svc-launch"
    assert config.imds_url == "http://169.254.169.254"


def test_optional_keys_take_their_defaults() -> None:
    config = parse_config(_with(lifecycle_hook=_DROP, deadline_seconds=_DROP))
    assert config.lifecycle_hook is None
    assert config.deadline_seconds == 240  # the documented default (docs/payload.md)
    assert config.ec2_endpoint_url is None and config.autoscaling_endpoint_url is None


def test_endpoints_and_imds_url_are_read() -> None:
    config = parse_config(
        _with(
            ec2_endpoint_url="http://203.0.113.10:5000",
            autoscaling_endpoint_url="https://autoscaling.example",
            cloudformation_endpoint_url="http://203.0.113.10:5001",
            cloudwatch_endpoint_url="https://monitoring.example",
            imds_url="http://127.0.0.1:8080/",
            test=True,
        )
    )
    assert config.test
    assert config.cloudformation_endpoint_url == "http://203.0.113.10:5001"
    assert config.cloudwatch_endpoint_url == "https://monitoring.example"
    assert config.ec2_endpoint_url == "http://203.0.113.10:5000"
    assert config.imds_url == "http://127.0.0.1:8080"


BAD = [
    # (document, the key the one line must name, a fragment of the problem)
    (_with(version=_DROP), "version", "required key is missing"),
    (_with(region=_DROP), "region", "required key is missing"),
    (_with(allocation_id=_DROP), "allocation_id", "required key is missing"),
    (_with(nat_by_subnet=_DROP), "nat_by_subnet", "required key is missing"),
    (_with(colour="blue"), "colour", "unknown key"),
    (_with(version="1"), "version", "expected an integer"),
    (_with(version=True), "version", "expected an integer"),
    (_with(version=2), "version", "not supported"),
    (_with(region=7), "region", "expected a string"),
    (_with(region="Sydney"), "region", "not an AWS region"),
    (_with(allocation_id="eip-0123"), "allocation_id", "not an allocation ID"),
    (_with(allocation_id="eipalloc-XYZ"), "allocation_id", "not an allocation ID"),
    (_with(allocation_id="eipalloc-0123456789abcdef01"), "allocation_id", "not an allocation ID"),
    (_with(nat_by_subnet=[]), "nat_by_subnet", "expected an object"),
    (_with(nat_by_subnet={}), "nat_by_subnet", "at least one subnet"),
    (_with(nat_by_subnet={"sn-0aaa": "10.0.0.4"}), 'nat_by_subnet["sn-0aaa"]', "not a subnet ID"),
    (_with(nat_by_subnet={"subnet-0AAA": "10.0.0.4"}), 'nat_by_subnet["subnet-0AAA"]', "not a subnet ID"),
    (
        _with(nat_by_subnet={"subnet-0aaa": "10.0.0.300"}),
        'nat_by_subnet["subnet-0aaa"]',
        "not an IPv4 address",
    ),
    (_with(nat_by_subnet={"subnet-0aaa": "10.0.0"}), 'nat_by_subnet["subnet-0aaa"]', "not an IPv4 address"),
    (_with(nat_by_subnet={"subnet-0aaa": 167772164}), 'nat_by_subnet["subnet-0aaa"]', "expected a string"),
    (_with(nat_by_subnet={"subnet-0aaa": "169.254.169.254"}), 'nat_by_subnet["subnet-0aaa"]', "cannot be"),
    (_with(lifecycle_hook="svc"), "lifecycle_hook", "expected an object"),
    (_with(lifecycle_hook={"hook": "h"}), "lifecycle_hook.auto_scaling_group", "required key is missing"),
    (
        _with(lifecycle_hook={"auto_scaling_group": "a", "hook": "h", "x": 1}),
        "lifecycle_hook.x",
        "unknown key",
    ),
    (_with(lifecycle_hook={"auto_scaling_group": "a", "hook": ""}), "lifecycle_hook.hook", "not a hook name"),
    (_with(deadline_seconds="240"), "deadline_seconds", "expected a number"),
    (_with(deadline_seconds=True), "deadline_seconds", "expected a number"),
    (_with(deadline_seconds=0), "deadline_seconds", "outside"),
    (_with(deadline_seconds=86400), "deadline_seconds", "outside"),
    # Past 270 s systemd's SIGTERM (TimeoutStartSec=330s) would cut the run before its own deadline.
    (_with(deadline_seconds=271), "deadline_seconds", "outside 1..270 seconds"),
    (_with(deadline_seconds=3600), "deadline_seconds", "TimeoutStartSec=330s"),
    (_with(ec2_endpoint_url="ftp://x"), "ec2_endpoint_url", "not an http(s) URL"),
    (_with(autoscaling_endpoint_url=5), "autoscaling_endpoint_url", "expected a string"),
    (_with(imds_url="169.254.169.254"), "imds_url", "not an http(s) URL"),
    # Plain HTTP would carry signed requests and the session token in clear through the NAT.
    (_with(ec2_endpoint_url="http://203.0.113.10"), "ec2_endpoint_url", '("test": true)'),
    (_with(cloudwatch_endpoint_url="http://x"), "cloudwatch_endpoint_url", "only in a test configuration"),
    (_with(test="yes"), "test", "expected true or false"),
    (
        _with(lifecycle_hook={"auto_scaling_group": "a", "hook": "h", "timeout_seconds": 10}),
        "lifecycle_hook.timeout_seconds",
        "from 30 to 7200",
    ),
    (
        _with(lifecycle_hook={"auto_scaling_group": "a", "hook": "h", "timeout_seconds": 660.5}),
        "lifecycle_hook.timeout_seconds",
        "whole number",
    ),
    (_with(signal={"stack": "S"}), "signal.resource", "required key is missing"),
    (_with(signal={"stack": "S", "resource": "Asg-1"}), "signal.resource", "not a logical resource ID"),
    (_with(signal={"stack": "1S", "resource": "Asg"}), "signal.stack", "not a CloudFormation stack name"),
    (_with(metrics={"namespace": "EipReclaim"}), "metrics.service", "required key is missing"),
    (_with(metrics={"namespace": "E", "service": "w", "x": 1}), "metrics.x", "unknown key"),
]


@pytest.mark.parametrize(("document", "key", "problem"), BAD, ids=[f"{k}:{p}" for _, k, p in BAD])
def test_bad_documents_name_the_key(document: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    message = str(caught.value)
    assert message.startswith(f"config: {key}: "), message
    assert problem in message
    assert "\n" not in message


def test_signal_metrics_and_the_hook_timeout_are_read() -> None:
    config = parse_config(
        _with(
            lifecycle_hook={"auto_scaling_group": "svc-asg", "hook": "svc-launch", "timeout_seconds": 660},
            signal={"stack": "EipReclaim-web", "resource": "GroupASG1234ABCD"},
            metrics={"namespace": "EipReclaim", "service": "web"},
        )
    )
    assert config.lifecycle_hook is not None and config.lifecycle_hook.timeout_seconds == 660
    assert config.signal is not None and config.signal.resource == "GroupASG1234ABCD"
    assert config.metrics is not None and config.metrics.service == "web"
    assert not config.test


def test_the_published_example_message() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_with(nat_by_subnet={"subnet-0aaa": "10.0.0.300"}))
    assert str(caught.value) == "config: nat_by_subnet[\"subnet-0aaa\"]: '10.0.0.300' is not an IPv4 address"


def test_top_level_must_be_an_object() -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        parse_config([GOOD])


def test_load_config_reports_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(broken))


@pytest.mark.parametrize(("document", "key", "problem"), BAD[:8], ids=[k for _, k, _ in BAD[:8]])
def test_main_exits_2_with_one_line_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], document: dict[str, Any], key: str, problem: str
) -> None:
    rig = Rig(tmp=tmp_path)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    assert rig.main(config=str(path)) == 2
    assert rig.netlink.calls == []
    assert rig.imds.reads == 0
    assert rig.ec2.calls == []
    assert not (tmp_path / "state").exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert f"config: {key}: " in lines[0] and problem in lines[0]


def test_the_deadline_may_reach_270_seconds() -> None:
    assert parse_config(_with(deadline_seconds=270)).deadline_seconds == 270.0


def test_the_deadline_cap_leaves_the_units_a_minute() -> None:
    from pathlib import Path

    from bootstrap.config import MAX_DEADLINE_SECONDS

    units = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
    for unit in ("eip-reclaim.service", "eip-reclaim-recheck.service"):
        limits = [
            line for line in (units / unit).read_text().splitlines() if line.startswith("TimeoutStartSec=")
        ]
        assert limits == ["TimeoutStartSec=330s"], unit
    assert MAX_DEADLINE_SECONDS <= 330 - 60
