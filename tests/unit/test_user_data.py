"""The user data: valid bash, small, and in a sandbox it installs a verified bundle or nothing at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk.assertions import Match, Template

from bootstrap.config import load_config
from stacks import user_data
from stacks.bundle import BundleInfo
from stacks.user_data import payload_user_data, render_user_data

REPO = Path(__file__).resolve().parents[2]
REGION = "ap-southeast-2"
BUCKET = "cdk-hnb659fds-assets-123456789012-ap-southeast-2"
# The DESIGN contract's example configuration.
CONFIG: dict[str, Any] = {
    "version": 1,
    "region": REGION,
    "allocation_id": "eipalloc-0123456789abcdef0",
    "nat_by_subnet": {"subnet-0aaa": "10.0.0.4", "subnet-0bbb": "10.0.1.4"},
    "lifecycle_hook": {"auto_scaling_group": "svc-asg", "hook": "svc-launch"},
    "deadline_seconds": 240,
}
# Stand-ins for the pseudo parameters CloudFormation fills in at deploy time.
PSEUDO = {
    "AWS::Region": REGION,
    "AWS::AccountId": "123456789012",
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "",
}


def fake_bundle(path: Path, marker: str) -> str:
    """A bundle with the real units and a stand-in payload; returns its SHA-256."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("bootstrap/__init__.py", f"MARKER = {marker!r}\n")
        archive.writestr("bootstrap/__main__.py", "print('payload')\n")
        for unit in sorted((REPO / "deploy/systemd").iterdir()):
            archive.write(unit, f"{user_data.UNITS_ARCDIR}/{unit.name}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def script_for(commands: str) -> str:
    """The user data exactly as EC2 receives it: what ec2.UserData.for_linux() renders."""
    rendered = ec2.UserData.for_linux()
    rendered.add_commands(commands)
    return rendered.render()


class Sandbox:
    """A temp root with stubbed aws, systemctl and logger first on PATH; records what they were asked."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.root.mkdir()
        self.calls = tmp_path / "calls"
        self.calls.mkdir()
        self.console = tmp_path / "console"
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.bundle = tmp_path / "served.zip"
        self._stub(
            "aws",
            'echo "${AWS_EC2_METADATA_V1_DISABLED:-unset}" >>"$SANDBOX_CALLS/aws-imdsv1-disabled"\n'
            'for arg; do dest="$arg"; done\ncp "$SANDBOX_BUNDLE" "$dest"\n',
        )
        self._stub("systemctl", "")
        # Like `logger -s`: each line to stderr; the journal is not part of the sandbox.
        self._stub("logger", "cat >&2\n")

    def _stub(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f'#!/bin/sh\necho "$*" >>"$SANDBOX_CALLS/{name}"\n{body}')
        path.chmod(0o755)

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        path = self.root.parent / "user-data.sh"
        path.write_text(script)
        env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "EIP_RECLAIM_ROOT": str(self.root),
            "EIP_RECLAIM_CONSOLE": str(self.console),
            "SANDBOX_CALLS": str(self.calls),
            "SANDBOX_BUNDLE": str(self.bundle),
        }
        return subprocess.run(
            ["bash", str(path)], env=env, capture_output=True, text=True, check=False, timeout=120
        )

    def called(self, name: str) -> list[str]:
        path = self.calls / name
        return path.read_text().splitlines() if path.exists() else []


def render(sha256: str, *, config: dict[str, Any] | None = None, key: str = "abc123.zip") -> str:
    return render_user_data(
        region=REGION, bucket=BUCKET, key=key, sha256=sha256, config_json=json.dumps(config or CONFIG)
    )


def test_bash_parses_and_shellcheck_is_clean(tmp_path: Path) -> None:
    script = tmp_path / "user-data.sh"
    script.write_text(script_for(render("0" * 64)))
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run(
        ["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_far_below_the_user_data_limit() -> None:
    script = script_for(render("0" * 64))
    size = len(script.encode())
    print(
        f"\nuser data: {size} bytes with the example configuration "
        f"({size / user_data.USER_DATA_LIMIT:.0%} of 16 KB)"
    )
    assert size < user_data.USER_DATA_LIMIT // 4
    assert script.startswith("#!/bin/bash\nset -euo pipefail\n")


def test_installs_a_verified_bundle(tmp_path: Path) -> None:
    box = Sandbox(tmp_path)
    sha = fake_bundle(box.bundle, "first")
    result = box.run(script_for(render(sha)))
    assert result.returncode == 0, result.stdout + result.stderr

    # Fetched from the asset through the AWS CLI, in the stack's region.
    assert box.called("aws") == [
        f"s3 cp --only-show-errors --region {REGION} s3://{BUCKET}/abc123.zip "
        + box.called("aws")[0].rsplit(" ", 1)[1]
    ]
    # ... whose instance credentials come from IMDSv2 only, never a v1 fallback.
    assert box.called("aws-imdsv1-disabled") == ["true"]
    # Unpacked in place and byte-compiled for the read-only service.
    app = box.root / user_data.INSTALL_DIR.lstrip("/")
    assert (app / "bootstrap/__init__.py").read_text() == "MARKER = 'first'\n"
    assert list((app / "bootstrap/__pycache__").glob("__init__.*.pyc"))
    # The services run as a dynamic user, not root: every file readable, every directory searchable.
    for path in (app.parent, app, *app.rglob("*")):
        assert stat.S_IMODE(path.stat().st_mode) & (0o005 if path.is_dir() else 0o004), path
    # The configuration: the contract's JSON, readable by root only.
    config = box.root / user_data.CONFIG_PATH.lstrip("/")
    assert json.loads(config.read_text()) == CONFIG
    # ... which the payload's own validator accepts.
    assert load_config(str(config)).allocation_id == CONFIG["allocation_id"]
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    # The units in place, enabled, the timer started and the boot run started without waiting.
    units = box.root / "etc/systemd/system"
    assert sorted(p.name for p in units.iterdir()) == sorted(
        p.name for p in (REPO / "deploy/systemd").iterdir()
    )
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in units.iterdir())
    assert box.called("systemctl") == [
        "daemon-reload",
        f"enable {user_data.BOOT_SERVICE} {user_data.TIMER}",
        f"start {user_data.TIMER}",
        f"start --no-block {user_data.BOOT_SERVICE}",
    ]
    # Logged to the console and to a file; no staging directory left behind.
    assert f"installed {app}" in box.console.read_text()
    assert "wrote" in (box.root / user_data.LOG_PATH.lstrip("/")).read_text()
    assert sorted(p.name for p in (box.root / "opt").iterdir()) == ["eip-reclaim"]


def test_refuses_a_bundle_with_the_wrong_hash(tmp_path: Path) -> None:
    box = Sandbox(tmp_path)
    fake_bundle(box.bundle, "tampered")
    result = box.run(script_for(render(hashlib.sha256(b"something else").hexdigest())))
    assert result.returncode != 0
    assert "SHA-256" in box.console.read_text()
    # Nothing installed, nothing started, nothing left over.
    assert not (box.root / "etc").exists()
    assert list((box.root / "opt").iterdir()) == []
    assert box.called("systemctl") == []


def test_a_second_install_replaces_the_first(tmp_path: Path) -> None:
    box = Sandbox(tmp_path)
    assert box.run(script_for(render(fake_bundle(box.bundle, "first")))).returncode == 0
    changed = dict(CONFIG, deadline_seconds=120)
    result = box.run(script_for(render(fake_bundle(box.bundle, "second"), config=changed)))
    assert result.returncode == 0, result.stdout + result.stderr
    app = box.root / user_data.INSTALL_DIR.lstrip("/")
    assert (app / "bootstrap/__init__.py").read_text() == "MARKER = 'second'\n"
    assert json.loads((box.root / user_data.CONFIG_PATH.lstrip("/")).read_text()) == changed
    assert sorted(p.name for p in (box.root / "opt").iterdir()) == ["eip-reclaim"]


def resolve(value: Any) -> Any:
    """Fill CloudFormation's pseudo parameters with stand-ins, as a deployment would."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return [resolve(v) for v in value]
    assert isinstance(value, dict) and len(value) == 1, value
    (function, argument), *_ = value.items()
    if function == "Ref":
        return PSEUDO[argument]
    if function == "Fn::Sub":
        text = argument
        for name, stand_in in PSEUDO.items():
            text = text.replace("${" + name + "}", stand_in)
        assert "${" not in text, text
        return text
    if function == "Fn::Join":
        separator, parts = argument
        return separator.join(resolve(p) for p in resolve(parts))
    raise AssertionError(f"unexpected intrinsic {function}")


def test_payload_user_data_from_a_real_asset_renders_a_working_script(tmp_path: Path) -> None:
    # The integration path: the bundle as a file asset, Aws.REGION, Stack.to_json_string(config).
    box = Sandbox(tmp_path)
    sha = fake_bundle(box.bundle, "tokens")
    info = BundleInfo(
        path=box.bundle, sha256=sha, size=box.bundle.stat().st_size, file_count=5, input_hash="x"
    )
    app = cdk.App(outdir=str(tmp_path / "cdk.out"))
    stack = cdk.Stack(app, "UserDataTokens")
    role = iam.Role(stack, "Role", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"))
    rendered = payload_user_data(stack, bundle=info, config=dict(CONFIG, region=cdk.Aws.REGION), role=role)
    template = stack.resolve(rendered.render())
    # Deploy-time values stay CloudFormation references, not synth-time guesses.
    assert {"Ref": "AWS::Region"} in template["Fn::Join"][1]
    script = resolve(template)
    path = tmp_path / "resolved.sh"
    path.write_text(script)
    result = subprocess.run(
        ["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout
    result = box.run(script)
    assert result.returncode == 0, result.stdout + result.stderr
    written = box.root / user_data.CONFIG_PATH.lstrip("/")
    assert json.loads(written.read_text()) == CONFIG
    assert load_config(str(written)).region == REGION
    # The object fetched is the asset's: its key derives from the bytes' hash, which the script verifies.
    asset = stack.node.find_child("Payload")
    assert isinstance(asset, s3_assets.Asset)
    assert asset.s3_object_key == f"{asset.asset_hash}.zip"
    assert box.called("aws")[0].split()[5] == f"s3://{BUCKET}/{asset.s3_object_key}"


def test_the_role_reads_only_the_payload_object(tmp_path: Path) -> None:
    box = Sandbox(tmp_path)
    sha = fake_bundle(box.bundle, "grant")
    info = BundleInfo(
        path=box.bundle, sha256=sha, size=box.bundle.stat().st_size, file_count=5, input_hash="x"
    )
    stack = cdk.Stack(cdk.App(outdir=str(tmp_path / "cdk.out")), "Grant")
    role = iam.Role(stack, "Role", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"))
    payload_user_data(stack, bundle=info, config=CONFIG, role=role)
    template = Template.from_stack(stack)
    # One GetObject on this object's ARN: no listing, no other asset of the bootstrap bucket.
    template.has_resource_properties(
        "AWS::IAM::Policy",
        {
            "PolicyDocument": {
                "Statement": [
                    {
                        "Sid": "ReadThePayload",
                        "Action": "s3:GetObject",
                        "Effect": "Allow",
                        "Resource": Match.object_like({"Fn::Join": Match.any_value()}),
                    }
                ]
            }
        },
    )
    statement = next(iter(template.find_resources("AWS::IAM::Policy").values()))["Properties"][
        "PolicyDocument"
    ]["Statement"][0]
    asset = stack.node.find_child("Payload")
    assert isinstance(asset, s3_assets.Asset)
    assert resolve(statement["Resource"]) == f"arn:aws:s3:::{BUCKET}/{asset.s3_object_key}"


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("region", "ap-southeast-2'; reboot; '", "region"),
        ("bucket", "Bucket_With_Capitals", "bucket"),
        ("key", "it's.zip", "key"),
        ("sha256", "abc", "sha256"),
        ("config_json", "{not json", "config_json"),
        ("config_json", "[1, 2]", "config_json"),
    ],
)
def test_bad_values_are_refused_naming_the_argument(argument: str, value: str, message: str) -> None:
    arguments = {
        "region": REGION,
        "bucket": BUCKET,
        "key": "abc.zip",
        "sha256": "0" * 64,
        "config_json": json.dumps(CONFIG),
    }
    arguments[argument] = value
    with pytest.raises(ValueError, match=f"^{message}:"):
        render_user_data(**arguments)


def test_shellcheck_is_installed() -> None:
    # The lint above needs it; CI installs it (.ci/run).
    assert shutil.which("shellcheck"), "shellcheck not found: apt-get install shellcheck"
    assert os.access("/usr/bin/python3", os.X_OK), "the user data unpacks with /usr/bin/python3"


def _flaky_aws(box: Sandbox, failures: int) -> None:
    """`aws s3 cp` that fails `failures` times before it serves the bundle; `sleep` recorded, not slept."""
    box._stub(
        "aws",
        f'n=$(wc -l <"$SANDBOX_CALLS/aws")\nif [ "$n" -le {failures} ]; then exit 1; fi\n'
        'for arg; do dest="$arg"; done\ncp "$SANDBOX_BUNDLE" "$dest"\n',
    )
    box._stub("sleep", "")


def test_the_bundle_download_is_retried_with_backoff(tmp_path: Path) -> None:
    # A boot can race the S3 endpoint's routes or meet a throttled S3: two failures still install.
    box = Sandbox(tmp_path)
    _flaky_aws(box, failures=2)
    result = box.run(script_for(render(fake_bundle(box.bundle, "retried"))))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(box.called("aws")) == 3
    assert box.called("sleep") == ["2", "4"]


def test_the_bundle_download_gives_up_after_five_attempts(tmp_path: Path) -> None:
    # Bounded: the lifecycle hook's window is for the payload, not for an S3 outage.
    box = Sandbox(tmp_path)
    _flaky_aws(box, failures=99)
    result = box.run(script_for(render(fake_bundle(box.bundle, "never"))))
    assert result.returncode != 0
    assert len(box.called("aws")) == 5
    assert box.called("sleep") == ["2", "4", "8", "16"]
    assert "cannot fetch" in box.console.read_text()
    assert box.called("systemctl") == []
