#!/usr/bin/env python3
"""CDK Pipelines: the eip-reclaim app, one stage per account and region, network before services.

cdk.json holds the list of environments, the pipeline's own account and region, the source repository
and the app's configuration (the same shape as the repository's cdk.json). Deploy the pipeline once by
hand (`cdk deploy` here); from then on it updates itself from the repository and deploys every stage in
list order, each environment's network stack before its service stacks (docs/ci.md).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aws_cdk as cdk
from aws_cdk import pipelines
from constructs import Construct

import eip_reclaim

# A stage's name becomes the prefix of its stacks' names: letters, digits and '-'.
_STAGE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,63}$")
_ACCOUNT = re.compile(r"^\d{12}$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")


@dataclass(frozen=True)
class Environment:
    """One account and region the app is deployed to; `approval` holds the pipeline before it, `config`
    replaces the shared configuration there (its own addresses to adopt, its own alert topic...)."""

    name: str
    account: str
    region: str
    approval: bool = False
    config: eip_reclaim.AppConfig | None = None


@dataclass(frozen=True)
class Source:
    """The repository the pipeline builds, through a CodeConnections connection (GitHub, GitLab, ...)."""

    repository: str
    branch: str
    connection_arn: str


class EipReclaimStage(cdk.Stage):
    """The app's stacks in one account and region; their names start with the stage's name."""

    def __init__(
        self, scope: Construct, construct_id: str, *, config: eip_reclaim.AppConfig, **kwargs: Any
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        # The network stack and one stack per service; each service stack depends on the network's,
        # so the pipeline deploys the network first. Each stage's network has its own alert topic.
        # cdk-nag runs once, on the whole app (main).
        self.stacks = eip_reclaim.build(self, config, checks=False)


class PipelineStack(cdk.Stack):
    """The pipeline: source, synth (`cdk synth` of this directory), then a stage per environment."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        source: Source,
        environments: Sequence[Environment],
        config: eip_reclaim.AppConfig,
        **kwargs: Any,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        synth = pipelines.ShellStep(
            "Synth",
            input=pipelines.CodePipelineSource.connection(
                source.repository, source.branch, connection_arn=source.connection_arn
            ),
            # The library from the same commit (pip builds the wheel), then this app's cloud assembly.
            install_commands=[
                "pip install -r requirements.txt .",
                "npm install --global aws-cdk@2.1148.1",
            ],
            commands=["cd examples/pipeline", "cdk synth --quiet --no-notices"],
            primary_output_directory="examples/pipeline/cdk.out",
        )
        self.pipeline = pipelines.CodePipeline(
            self,
            "Pipeline",
            synth=synth,
            # Stages in other accounts: the artifact bucket's key must be shared with them.
            cross_account_keys=True,
            # Every change to the pipeline itself goes through the pipeline.
            self_mutation=True,
        )
        self.stages: list[EipReclaimStage] = []
        for environment in environments:
            stage = EipReclaimStage(
                self,
                environment.name,
                config=environment.config or config,
                env=cdk.Environment(account=environment.account, region=environment.region),
            )
            approval = pipelines.ManualApprovalStep(f"Approve-{environment.name}")
            pre = [approval] if environment.approval else []
            self.pipeline.add_stage(stage, pre=pre)
            self.stages.append(stage)


def environments_from(raw: object) -> list[Environment]:
    """The context's `environments`: a list of {name, account, region, approval?, config?}; errors name
    the key."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("environments: expected a non-empty list of {name, account, region}")
    found: list[Environment] = []
    for index, item in enumerate(raw):
        key = f"environments[{index}]"
        if not isinstance(item, Mapping) or not {"name", "account", "region"} <= set(item):
            raise ValueError(f"{key}: expected an object with name, account and region")
        unknown = set(item) - {"name", "account", "region", "approval", "config"}
        if unknown:
            raise ValueError(f"{key}.{sorted(unknown)[0]}: unknown key")
        environment = Environment(
            name=str(item["name"]),
            account=str(item["account"]),
            region=str(item["region"]),
            approval=bool(item.get("approval", False)),
            config=eip_reclaim.from_context(item["config"]) if "config" in item else None,
        )
        if not _STAGE_NAME.match(environment.name):
            raise ValueError(f"{key}.name: {environment.name!r} must be a letter then letters, digits or '-'")
        if not _ACCOUNT.match(environment.account):
            raise ValueError(f"{key}.account: {environment.account!r} is not a 12-digit account id")
        if not _REGION.match(environment.region):
            raise ValueError(f"{key}.region: {environment.region!r} is not a region name")
        if environment.name in {e.name for e in found}:
            raise ValueError(f"{key}.name: {environment.name!r} appears more than once")
        found.append(environment)
    return found


def build_app(app: cdk.App) -> PipelineStack:
    """The pipeline stack from the app's context (cdk.json)."""
    pipeline = app.node.try_get_context("pipeline")
    if not isinstance(pipeline, Mapping):
        raise ValueError("pipeline: expected an object with account, region and source")
    source = pipeline.get("source")
    if not isinstance(source, Mapping):
        raise ValueError("pipeline.source: expected an object with repository, branch and connection_arn")
    return PipelineStack(
        app,
        "EipReclaimPipeline",
        source=Source(
            repository=str(source["repository"]),
            branch=str(source["branch"]),
            connection_arn=str(source["connection_arn"]),
        ),
        environments=environments_from(app.node.try_get_context("environments")),
        config=eip_reclaim.from_context(app.node.try_get_context(eip_reclaim.CONTEXT_KEY)),
        env=cdk.Environment(account=str(pipeline["account"]), region=str(pipeline["region"])),
    )


def main() -> int:
    app = cdk.App()
    try:
        build_app(app)
    except (ValueError, KeyError) as err:
        print(f"eip-reclaim pipeline: bad configuration: {err}", file=sys.stderr)
        return 2
    # No cdk-nag here: it checks a whole app, and the pipeline's own roles and buckets are CDK Pipelines'
    # defaults. The stages' stacks carry the library's acknowledgements; the repository's tests run
    # cdk-nag on them bound to an account and region, as here.
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
