"""CI deploys: the GitHub Actions workflow (actionlint, OIDC, synth once, diff, deploy per environment) and
the CDK Pipelines app (a stage per account and region, in list order, the network before the services)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
import yaml

from tests.unit.cdk_app import REPO
from tests.unit.test_library import load_example

WORKFLOW = REPO / "examples" / "github-actions" / "deploy.yml"
PIPELINE_DIR = REPO / "examples" / "pipeline"
ACTIONLINT = Path(sys.executable).parent / "actionlint"


# --- GitHub Actions ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return body


def test_actionlint_passes_on_the_workflow() -> None:
    # Unknown inputs of the actions used, bad expressions, deprecated runtimes, shell mistakes in run:.
    result = subprocess.run(
        [str(ACTIONLINT), "-no-color", str(WORKFLOW)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_fails_on_a_broken_workflow(tmp_path: Path) -> None:
    # The check above can fail: a misspelt input of configure-aws-credentials is caught.
    broken = tmp_path / "deploy.yml"
    broken.write_text(WORKFLOW.read_text().replace("role-to-assume:", "role-to-asume:"))
    result = subprocess.run(
        [str(ACTIONLINT), "-no-color", str(broken)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1 and 'input "role-to-asume" is not defined' in result.stdout


def _steps(job: dict[str, Any], uses: str) -> list[dict[str, Any]]:
    return [s for s in job["steps"] if str(s.get("uses", "")).startswith(uses)]


def _runs(job: dict[str, Any]) -> str:
    return "\n".join(str(s.get("run", "")) for s in job["steps"])


def test_credentials_come_from_oidc_only(workflow: dict[str, Any]) -> None:
    # No stored keys anywhere: each deploy job asks GitHub for an OIDC token and assumes its role.
    assert "secrets." not in WORKFLOW.read_text()
    assert workflow["permissions"] == {}
    for name, job in workflow["jobs"].items():
        assume = _steps(job, "aws-actions/configure-aws-credentials@")
        if not name.startswith("deploy-"):
            assert assume == [] and "id-token" not in job["permissions"], name
            continue
        assert job["permissions"] == {"contents": "read", "id-token": "write"}, name
        (step,) = assume
        assert step["with"]["role-to-assume"] == "${{ vars.DEPLOY_ROLE_ARN }}"
        assert not {"aws-access-key-id", "aws-secret-access-key"} & set(step["with"])


def test_synth_once_then_diff_and_deploy_the_same_assembly(workflow: dict[str, Any]) -> None:
    synth = workflow["jobs"]["synth"]
    assert "cdk synth" in _runs(synth)
    (upload,) = _steps(synth, "actions/upload-artifact@")
    for name in ("deploy-staging", "deploy-production"):
        job = workflow["jobs"][name]
        (download,) = _steps(job, "actions/download-artifact@")
        assert download["with"]["name"] == upload["with"]["name"]
        runs = _runs(job)
        # Nothing is synthesized again: diff and deploy read the downloaded assembly, without a prompt.
        assert "cdk synth" not in runs
        assert "cdk diff --app cdk.out" in runs
        assert "cdk deploy --app cdk.out --all --require-approval never" in runs
        assert runs.index("cdk diff") < runs.index("cdk deploy")


def test_production_waits_for_staging_and_its_environment(workflow: dict[str, Any]) -> None:
    # The approval is GitHub's: required reviewers on the "production" environment hold the job.
    jobs = workflow["jobs"]
    assert (jobs["deploy-staging"]["environment"], jobs["deploy-staging"]["needs"]) == ("staging", "synth")
    assert (jobs["deploy-production"]["environment"], jobs["deploy-production"]["needs"]) == (
        "production",
        "deploy-staging",
    )


# --- CDK Pipelines -------------------------------------------------------------------------------------


@functools.cache
def pipeline() -> tuple[Any, Path, list[dict[str, Any]]]:
    """The pipeline example synthesized from its cdk.json: its stack, the outdir, its CodePipeline stages."""
    module = load_example(PIPELINE_DIR / "pipeline_app.py")
    context = json.loads((PIPELINE_DIR / "cdk.json").read_text())["context"]
    outdir = Path(tempfile.mkdtemp(prefix="eipr-pipeline-"))
    app = cdk.App(context=context, outdir=str(outdir))
    stack = module.build_app(app)
    app.synth()
    template = json.loads((outdir / f"{stack.artifact_id}.template.json").read_text())
    (resource,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::CodePipeline::Pipeline"]
    return stack, outdir, resource["Properties"]["Stages"]


def _environments() -> list[dict[str, Any]]:
    environments: list[dict[str, Any]] = json.loads((PIPELINE_DIR / "cdk.json").read_text())["context"][
        "environments"
    ]
    return environments


def test_one_stage_per_environment_in_list_order() -> None:
    _, _, stages = pipeline()
    names = [s["Name"] for s in stages]
    assert names == ["Source", "Build", "UpdatePipeline", "Assets", *(e["name"] for e in _environments())]


def test_each_stage_deploys_the_network_before_the_services() -> None:
    # CodePipeline runs a stage's actions by RunOrder: every network action before any service action.
    _, _, stages = pipeline()
    for stage in stages[4:]:
        actions = {a["Name"]: a["RunOrder"] for a in stage["Actions"]}
        network = [order for name, order in actions.items() if name.startswith("EipReclaim-Network.")]
        services = [order for name, order in actions.items() if name.startswith("EipReclaim-web.")]
        assert len(network) == 2 and len(services) == 2, actions
        assert actions["EipReclaim-Network.Prepare"] < actions["EipReclaim-Network.Deploy"]
        assert max(network) < min(services), stage["Name"]


def test_approval_only_where_the_list_asks_for_it() -> None:
    _, _, stages = pipeline()
    for environment, stage in zip(_environments(), stages[4:], strict=True):
        approvals = [a for a in stage["Actions"] if a["ActionTypeId"]["Category"] == "Approval"]
        if environment.get("approval"):
            assert [a["RunOrder"] for a in approvals] == [1], "the approval comes first"
        else:
            assert approvals == []


def test_each_stage_has_its_own_stack_names_account_region_and_alert_topic() -> None:
    stack, outdir, _ = pipeline()
    names = set()
    for environment, stage in zip(_environments(), stack.stages, strict=True):
        network, services = stage.stacks.network, stage.stacks.services
        assert network.stack_name == f"{environment['name']}-EipReclaim-Network"
        assert (network.account, network.region) == (environment["account"], environment["region"])
        names |= {network.stack_name, *(s.stack_name for s in services)}
        assembly = outdir / f"assembly-{stack.stack_name}-{environment['name']}"
        body = json.loads((assembly / f"{network.artifact_id}.template.json").read_text())
        topics = [r for r in body["Resources"].values() if r["Type"] == "AWS::SNS::Topic"]
        assert len(topics) == 1
    assert len(names) == 2 * len(_environments()), "no two stages share a stack name"


def test_the_stages_templates_differ_only_by_their_names_accounts_and_regions() -> None:
    # The stacks stay environment-agnostic: the account and region come from the stage (CDK writes them
    # into ARNs as literals), never from the code.
    stack, outdir, _ = pipeline()
    bodies = []
    for environment in _environments():
        assembly = outdir / f"assembly-{stack.stack_name}-{environment['name']}"
        (network,) = sorted(assembly.glob("*Network*.template.json"))
        body = network.read_text().replace(environment["name"], "<stage>")
        bodies.append(
            body.replace(environment["account"], "<account>").replace(environment["region"], "<region>")
        )
    assert len(set(bodies)) == 1


def test_an_environment_adopts_its_own_address() -> None:
    # Elastic IPs belong to one account and region: production adopts the address its clients know,
    # staging allocates its own (and keeps it when its stack goes).
    stack, outdir, _ = pipeline()
    for environment, stage in zip(_environments(), stack.stages, strict=True):
        (service,) = stage.stacks.services
        assembly = outdir / f"assembly-{stack.stack_name}-{environment['name']}"
        body = json.loads((assembly / f"{service.artifact_id}.template.json").read_text())
        eips = [r for r in body["Resources"].values() if r["Type"] == "AWS::EC2::EIP"]
        adopted = environment.get("config", {}).get("services", [{}])[0].get("allocation_id")
        if adopted:
            assert eips == [] and body["Outputs"]["AllocationId"]["Value"] == adopted
        else:
            assert len(eips) == 1
