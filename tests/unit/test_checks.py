"""Whole-app checks: cdk-nag AwsSolutions, IMDSv2 everywhere, cfn-lint on every synthesized template."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.unit.cdk_app import (
    BYO_RAWS,
    Synthesized,
    byo_app,
    default_app,
    endpoints_app,
    ipv6_app,
    launch_first_app,
    multi_app,
    spot_app,
)

# cfn-lint rules a template may ignore, each on the resources that carry it in their metadata, and why.
CFN_LINT_IGNORED = {
    "E1152": "NAT launch templates take ImageId 'resolve:ssm:<AL2023 parameter>', which EC2 resolves at "
    "launch (cfn-lint knows only 'ami-...'): every NAT the group launches boots the current image.",
}


# Every configuration the tests synthesize: each network mode, in a new VPC and in a team's own, and
# each group shape (terminate-first, launch-first with and without a warm pool, Spot).
APPS = {
    "default": default_app,
    "multi": multi_app,
    "launch-first": launch_first_app,
    "spot": spot_app,
    "ipv6": ipv6_app,
    "interface-endpoints": endpoints_app,
    **{f"own-vpc-{egress}": (lambda egress=egress: byo_app(egress)) for egress in sorted(BYO_RAWS)},
}


@pytest.fixture(scope="module", params=sorted(APPS))
def app(request: pytest.FixtureRequest) -> Synthesized:
    return APPS[request.param]()


def test_cdk_nag_finds_nothing_unacknowledged(app: Synthesized) -> None:
    # Synthesis would have failed on an unacknowledged finding; the report says so explicitly too.
    report = app.validation_report()
    conclusions = {plugin["pluginName"]: plugin["conclusion"] for plugin in report["pluginReports"]}
    assert conclusions["AwsSolutions"] == "success"
    for plugin in report["pluginReports"]:
        assert plugin["violations"] == [], plugin["pluginName"]


def test_every_acknowledgement_has_a_specific_reason(app: Synthesized) -> None:
    # An acknowledgement without a reason (or with a stock one) hides a finding instead of explaining it.
    acknowledged = [
        s
        for plugin in app.validation_report()["pluginReports"]
        for s in plugin.get("suppressedViolations", [])
    ]
    assert acknowledged, "the app is expected to acknowledge some findings"
    for finding in acknowledged:
        assert len(finding["reason"]) > 40, finding["ruleName"]
    rules = {f["acknowledgedId"].split("::", 1)[1] for f in acknowledged}
    assert "AwsSolutions-EC23" not in rules or app.config.services[0].ingress_cidr == "0.0.0.0/0"


def test_an_unacknowledged_finding_fails_synthesis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The check has teeth: without the acknowledgements, `cdk synth` fails.
    from stacks import nag
    from tests.unit.cdk_app import DEFAULT_RAW, synthesize

    monkeypatch.setattr(nag, "acknowledge", lambda *_: None)
    with pytest.raises(RuntimeError, match=r"^ValidationFailed") as caught:
        synthesize(DEFAULT_RAW, tmp_path)
    assert "AwsSolutions-EC23" in str(caught.value)


def _templates_with(app: Synthesized, type_: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (name, logical_id, resource)
        for name, body in app.templates().items()
        for logical_id, resource in body["Resources"].items()
        if resource["Type"] == type_
    ]


def test_imdsv2_is_required_on_every_launch_template_and_instance(app: Synthesized) -> None:
    # IMDSv1 would let any request forged through the instance read its role credentials.
    templates = _templates_with(app, "AWS::EC2::LaunchTemplate")
    instances = _templates_with(app, "AWS::EC2::Instance")
    # One per service and one per NAT; no bare instance (a NAT is a group of one too).
    nats = app.config.network.az_count if app.config.network.uses_nat_instances else 0
    assert len(templates) == len(app.config.services) + nats
    assert not instances
    for name, logical_id, resource in templates:
        options = resource["Properties"]["LaunchTemplateData"]["MetadataOptions"]
        assert options["HttpTokens"] == "required", (name, logical_id)
        assert options["HttpPutResponseHopLimit"] == 1, (name, logical_id)
    for name, logical_id, resource in instances:
        assert "LaunchTemplate" not in resource["Properties"], (name, logical_id)
        assert resource["Properties"]["MetadataOptions"]["HttpTokens"] == "required", (name, logical_id)
    assert not _templates_with(app, "AWS::AutoScaling::LaunchConfiguration")


def test_cfn_lint_passes_on_every_template(app: Synthesized) -> None:
    # CloudFormation would reject (or misread) what cfn-lint flags; fail here rather than at deploy.
    files = sorted(str(p) for p in app.outdir.glob("*.template.json"))
    assert len(files) == 1 + len(app.config.services)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), "--format", "parseable", *files],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_cfn_lint_ignores_only_the_listed_rules(app: Synthesized) -> None:
    # Every rule a resource asks cfn-lint to skip is listed above with its reason (only NATs ask).
    ignored = {
        rule
        for body in app.templates().values()
        for resource in body["Resources"].values()
        for rule in resource.get("Metadata", {})
        .get("cfn-lint", {})
        .get("config", {})
        .get("ignore_checks", [])
    }
    assert ignored == (set(CFN_LINT_IGNORED) if app.config.network.uses_nat_instances else set())


# checkov checks a template may skip (in its resources' Metadata.checkov.skip), each by design.
CHECKOV_SKIPPED = {
    "CKV_AWS_88": "A NAT instance needs a public IPv4 of its own to forward the VPC's traffic and to call "
    "the EC2 API at boot; its security group admits only the VPC.",
    "CKV_AWS_260": "Only when a service's configuration opens port 80 to 0.0.0.0/0: serving HTTP to the "
    "internet is then the configuration's intent.",
}


def checkov_binary() -> str:
    """checkov lives in its own venv (its pins clash with boto3's and pytest's): see the Makefile."""
    found = Path(sys.executable).parent.parent / "checkov" / "bin" / "checkov"
    if found.exists():
        return str(found)
    on_path = shutil.which("checkov")
    assert on_path, "checkov is not installed: run `make setup`"
    return on_path


def test_checkov_finds_no_failed_check(app: Synthesized) -> None:
    # checkov's CloudFormation checks over every synthesized template, offline: zero failed.
    files = sorted(str(p) for p in app.outdir.glob("*.template.json"))
    args = [checkov_binary(), "--skip-download", "--quiet", "--compact", "--framework", "cloudformation"]
    done = subprocess.run(
        [*args, "--output", "json", *(a for f in files for a in ("--file", f))],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        (c["check_id"], c["resource"]) for r in reports for c in r.get("results", {}).get("failed_checks", [])
    ]
    assert failed == [], failed
    # Evidence that checkov read real templates (a NAT-free network has fewer resources to check).
    floor = 50 if app.config.network.uses_nat_instances else 35
    assert sum(r["summary"]["passed"] for r in reports) > floor
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports)


def test_checkov_skips_only_the_listed_checks_with_their_reasons(app: Synthesized) -> None:
    # Every by-design skip sits in the template beside the resource it concerns, with its reason.
    skips = [
        skip
        for body in app.templates().values()
        for resource in body["Resources"].values()
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", [])
    ]
    assert {s["id"] for s in skips} <= set(CHECKOV_SKIPPED)
    # The NATs' public IPv4 is a by-design skip, where there are NATs.
    assert ("CKV_AWS_88" in {s["id"] for s in skips}) == app.config.network.uses_nat_instances
    assert ("CKV_AWS_260" in {s["id"] for s in skips}) == any(
        80 in svc.ingress_ports and svc.ingress_cidr == "0.0.0.0/0" for svc in app.config.services
    )
    for skip in skips:
        assert len(skip["comment"]) > 40, skip
