"""The warm pool and the watchdog in the stacks: configuration, the group, the role, the user data."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Template

from bootstrap.config import load_config
from stacks.config import ConfigError, HealthCheckConfig, parse
from stacks.healing_service import (
    LIFECYCLE_HOOK_NAME,
    WATCHDOG_PERIOD_SECONDS,
)
from stacks.user_data import BOOT_SERVICE, CONFIG_PATH, TIMER, WATCHDOG_TIMER, render_user_data
from tests.unit.cdk_app import DEFAULT_RAW, REPO, Synthesized, default_app, multi_app
from tests.unit.test_healing_service import logical_id_of, payload_config_of, statements, the, user_data_of
from tests.unit.test_user_data import BUCKET, CONFIG, REGION, Sandbox, fake_bundle, script_for

GROUP = "AWS::AutoScaling::AutoScalingGroup"


@pytest.fixture(scope="module")
def app() -> Synthesized:
    # MULTI_RAW's "web" service has both: warm_pool true and health_check {"port": 80, "path": "/"}.
    return multi_app()


@pytest.fixture(scope="module")
def template(app: Synthesized) -> Template:
    return app.template(app.stacks.services[0])


@pytest.fixture(scope="module")
def plain() -> Template:
    # The default service: neither feature.
    default = default_app()
    return default.template(default.service)


def service(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(DEFAULT_RAW)
    raw["services"] = [{"name": "web", **changes}]
    return raw


# -- configuration ----------------------------------------------------------------------------------


def test_both_are_off_by_default() -> None:
    # An existing deployment changes nothing until a team asks for either.
    (web,) = parse(DEFAULT_RAW).services
    assert (web.warm_pool, web.health_check) == (False, None)


def test_a_health_check_takes_the_payloads_defaults() -> None:
    # Only the port is required; failures and grace match bootstrap/config.py's defaults.
    (web,) = parse(service(health_check={"port": 8080})).services
    assert web.health_check == HealthCheckConfig(port=8080, path=None, failures=3, grace_seconds=60)


@pytest.mark.parametrize(
    ("changes", "key", "message"),
    [
        ({"warm_pool": "yes"}, "services[0].warm_pool", "expected true or false"),
        ({"health_check": {"path": "/"}}, "services[0].health_check.port", "required key is missing"),
        ({"health_check": {"port": 0}}, "services[0].health_check.port", "not a TCP port"),
        ({"health_check": {"port": 80, "path": "healthz"}}, "services[0].health_check.path", "absolute"),
        ({"health_check": {"port": 80, "failures": 0}}, "services[0].health_check.failures", "1 to 100"),
        (
            {"health_check": {"port": 80, "grace_seconds": 3601}},
            "services[0].health_check.grace_seconds",
            "0 to",
        ),
        ({"health_check": {"port": 80, "interval": 5}}, "services[0].health_check.interval", "unknown key"),
        ({"health_check": 80}, "services[0].health_check", "expected an object"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(changes: dict[str, Any], key: str, message: str) -> None:
    # The same bounds the payload applies, so an instance never refuses what synth accepted.
    with pytest.raises(ConfigError) as caught:
        parse(service(**changes))
    assert caught.value.key == key and message in caught.value.problem
    assert "\n" not in str(caught.value)


def test_a_warm_pool_is_refused_on_an_ipv6_egress() -> None:
    # A warming instance holds no address: over IPv6 alone it cannot reach Auto Scaling to CONTINUE.
    raw = service(warm_pool=True)
    raw["network"] = {"egress": "ipv6"}
    with pytest.raises(ConfigError, match=r"^services\[0\]\.warm_pool: .*ipv6"):
        parse(raw)


# -- the warm pool ----------------------------------------------------------------------------------


def test_the_warm_pool_keeps_one_stopped_instance(template: Template) -> None:
    # Stopped: leaving the pool is a boot, so the payload (a boot unit) claims. Size 1 said outright
    # (its own minimum; prepared capacity = the one in service + the one in the pool), never recycled.
    template.resource_count_is("AWS::AutoScaling::WarmPool", 1)
    template.has_resource_properties(
        "AWS::AutoScaling::WarmPool",
        {
            "AutoScalingGroupName": {"Ref": logical_id_of(template, GROUP)},
            # One stopped instance beside the one in service.
            "MinSize": 1,
            "MaxGroupPreparedCapacity": 2,
            "PoolState": "Stopped",
            "InstanceReusePolicy": {"ReuseOnScaleIn": False},
        },
    )


def test_no_warm_pool_unless_asked(plain: Template) -> None:
    # A stopped instance costs its EBS volume: only for services that ask.
    plain.resource_count_is("AWS::AutoScaling::WarmPool", 0)


def test_the_group_still_keeps_one_in_service(template: Template) -> None:
    # The pool sits beside the group: min = max = desired = 1 (terminate-first, the default).
    group = the(template, GROUP)["Properties"]
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == ("1", "1", "1")


def test_one_hook_holds_both_transitions_with_the_first_boots_window(template: Template) -> None:
    # The launch hook fires into the pool (first boot: install, compile, CONTINUE) and out of it (a start:
    # the claim); each is its own action with the full window, sized for the longer first boot.
    group = the(template, GROUP)["Properties"]
    assert group["LifecycleHookSpecificationList"] == [
        {
            "LifecycleHookName": LIFECYCLE_HOOK_NAME,
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "DefaultResult": "ABANDON",
            # 120 s of boot and install, a 240 s run, the unit's 30 s restart delay, one more 240 s run.
            "HeartbeatTimeout": 660,
        }
    ]


def test_instances_carry_a_launch_template_version_number(template: Template) -> None:
    # The yield rule compares EC2's aws:ec2launchtemplate:version tag: the group names a version number
    # (never "$Latest"/"$Default"), so a pool instance left from before an update carries a smaller one.
    group = the(template, GROUP)["Properties"]
    assert group["LaunchTemplate"]["Version"] == {
        "Fn::GetAtt": [logical_id_of(template, "AWS::EC2::LaunchTemplate"), "LatestVersionNumber"]
    }


def test_the_create_waits_for_the_in_service_instance_only(template: Template) -> None:
    # One signal: the pool's instance CONTINUEs without signalling (bootstrap/report.py, warmed).
    group = the(template, GROUP)
    assert group["CreationPolicy"]["ResourceSignal"]["Count"] == 1


# -- the watchdog -----------------------------------------------------------------------------------


def test_the_payload_config_carries_the_health_check(app: Synthesized, template: Template) -> None:
    # The watchdog reads the same file, in the shape bootstrap/config.py validates.
    config = payload_config_of(template, app.template_json(app.network))
    assert config["health_check"] == {"port": 80, "path": "/", "failures": 3, "grace_seconds": 60}


def test_no_health_check_in_the_payload_config_unless_asked(plain: Template) -> None:
    # Absent: the watchdog has nothing to probe and its timer stays disabled.
    default = default_app()
    assert "health_check" not in payload_config_of(plain, default.template_json(default.network))


def test_the_user_data_enables_the_watchdog_timer_only_with_a_health_check(
    app: Synthesized, template: Template, plain: Template
) -> None:
    # The bundle ships the watchdog units to every service; only a configured one runs them.
    script = user_data_of(template, app.template_json(app.network))
    assert f"systemctl enable {BOOT_SERVICE} {TIMER} {WATCHDOG_TIMER}\n" in script
    assert f"systemctl start {TIMER} {WATCHDOG_TIMER}\n" in script
    default = default_app()
    assert WATCHDOG_TIMER not in user_data_of(plain, default.template_json(default.network))


def test_the_role_may_report_only_its_own_groups_health(template: Template, plain: Template) -> None:
    # SetInstanceHealth on this group only; a service without a watchdog has no such grant.
    (statement,) = [s for s in statements(template) if s.get("Sid") == "ReportItsOwnHealth"]
    assert statement["Action"] == "autoscaling:SetInstanceHealth"
    assert statement["Resource"]["Fn::Join"][1][-1] == ":autoScalingGroup:*:autoScalingGroupName/Multi-web"
    assert not [s for s in statements(plain) if "autoscaling:SetInstanceHealth" in str(s["Action"])]


def test_the_groups_grace_period_ends_before_the_watchdogs_first_report(template: Template) -> None:
    # An Unhealthy inside the group's grace (ShouldRespectGracePeriod) is ignored and the watchdog reports
    # once: the group's grace ends one timer period before the watchdog's own grace does.
    group = the(template, GROUP)["Properties"]
    assert group["HealthCheckType"] == "EC2"
    # The watchdog's default 60 s grace, less the timer's 10 s period (eip-reclaim-watchdog.timer).
    assert group["HealthCheckGracePeriod"] == 50


def test_the_grace_period_is_untouched_without_a_watchdog(plain: Template) -> None:
    # The default service keeps the group as it was.
    group = the(plain, GROUP)["Properties"]
    assert "HealthCheckGracePeriod" not in group


def test_the_watchdog_period_is_the_timers() -> None:
    # The grace arithmetic above assumes the timer's period.
    timer = (REPO / "deploy/systemd/eip-reclaim-watchdog.timer").read_text()
    assert re.search(rf"^OnUnitActiveSec={WATCHDOG_PERIOD_SECONDS}s$", timer, re.M)


def test_docs_name_both_keys() -> None:
    # A user finds both options where the others are described, and the failover page explains them.
    for doc in ("docs/configuration.md", "README.md", "docs/failover.md"):
        text = (REPO / doc).read_text()
        assert "`services[].warm_pool`" in text or doc == "docs/failover.md", doc
        assert "warm_pool" in text and "health_check" in text, doc


def test_the_installed_config_and_units_start_the_watchdog(tmp_path: Path) -> None:
    # In the user data's sandbox: the payload's own validator reads the stacks' health_check, and the
    # watchdog's timer is enabled and started beside the payload's.
    box = Sandbox(tmp_path)
    sha = fake_bundle(box.bundle, "watchdog")
    check = {"port": 8080, "path": "/healthz", "failures": 3, "grace_seconds": 60}
    config = dict(CONFIG, health_check=check)
    script = script_for(
        render_user_data(
            region=REGION,
            bucket=BUCKET,
            key="k.zip",
            sha256=sha,
            config_json=json.dumps(config),
            watchdog=True,
        )
    )
    result = box.run(script)
    assert result.returncode == 0, result.stdout + result.stderr
    written = load_config(str(box.root / CONFIG_PATH.lstrip("/")))
    assert written.health_check is not None
    assert (written.health_check.port, written.health_check.path) == (8080, "/healthz")
    assert box.called("systemctl")[1:3] == [
        f"enable {BOOT_SERVICE} {TIMER} {WATCHDOG_TIMER}",
        f"start {TIMER} {WATCHDOG_TIMER}",
    ]
