"""The instance's user data: fetch and verify the payload bundle, install it, its configuration and units."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from typing import Any

from aws_cdk import AssetHashType, Aws, Stack, Token
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from .bundle import BundleInfo

# Where the payload lives on the instance; the systemd units name the same paths.
INSTALL_DIR = "/opt/eip-reclaim"
CONFIG_PATH = "/etc/eip-reclaim/config.json"
LOG_PATH = "/var/log/eip-reclaim-user-data.log"
# The bundle's directory of unit files (stacks.bundle.UNITS_ARCDIR).
UNITS_ARCDIR = "systemd-units"
BOOT_SERVICE = "eip-reclaim.service"
TIMER = "eip-reclaim.timer"
# Enabled only for a service with a health_check: without one the watchdog has nothing to probe.
WATCHDOG_TIMER = "eip-reclaim-watchdog.timer"
# EC2 rejects user data above 16 KB (before base64); this text stays a small fraction of it.
USER_DATA_LIMIT = 16 * 1024

_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Deliberately narrower than S3 allows: nothing that could end a single-quoted shell word.
_KEY = re.compile(r"^[A-Za-z0-9!_.*()/-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The heredoc's end marker: a compact JSON object is one line starting with "{", so it can never be this.
_CONFIG_EOF = "EIP_RECLAIM_CONFIG"

# Bash, and $-free on the Python side: string.Template's ${name} marks the only substitutions, so every
# shell variable is written $name (or "$name") without braces. No tabs, no long lines: it lands in a
# CloudFormation template and the EC2 console verbatim.
_SCRIPT = string.Template(
    """\
set -euo pipefail
# Install prefix and console: overridable only to exercise this script in a sandbox.
root="$${EIP_RECLAIM_ROOT:-}"
console="$${EIP_RECLAIM_CONSOLE:-/dev/console}"
umask 022
mkdir -p "$$root/var/log"
# Every line to a log file, the journal and the serial console (visible in get-console-output).
exec > >(tee -a "$$root${log_path}" | logger -t eip-reclaim-user-data -s 2>>"$$console") 2>&1

region='${region}'
bundle_url='s3://${bucket}/${key}'
bundle_sha256='${sha256}'
app="$$root${install_dir}"
config="$$root${config_path}"

# Staged beside its destination, so the final rename stays on one filesystem and is atomic.
mkdir -p "$$root/opt"
work="$$(mktemp -d "$$root/opt/.eip-reclaim.XXXXXX")"
trap 'rm -rf "$$work"' EXIT

echo "fetching $$bundle_url"
# No public IP yet: this goes through the VPC's S3 gateway endpoint. The CLI's instance credentials
# come from IMDSv2 only, as the payload's do.
export AWS_EC2_METADATA_V1_DISABLED=true
# Retried with backoff (2, 4, 8, 16 s): a boot can race the endpoint's routes or a throttled S3.
attempt=1
until aws s3 cp --only-show-errors --region "$$region" "$$bundle_url" "$$work/bundle.zip"; do
  if [ "$$attempt" -ge 5 ]; then
    echo "error: cannot fetch $$bundle_url after $$attempt attempts; nothing installed" >&2
    exit 1
  fi
  sleep $$((2 ** attempt))
  attempt=$$((attempt + 1))
done
if ! echo "$$bundle_sha256  $$work/bundle.zip" | sha256sum --check --strict --quiet -; then
  echo "error: bundle SHA-256 is not $$bundle_sha256; nothing installed" >&2
  exit 1
fi

/usr/bin/python3 -S -m zipfile -e "$$work/bundle.zip" "$$work/app"
# The service runs with /opt read-only: compile now, with the interpreter that will run it.
/usr/bin/python3 -S -m compileall -q -j 0 "$$work/app" >/dev/null
if [ -e "$$app" ]; then
  mv -T "$$app" "$$work/previous"
fi
mv -T "$$work/app" "$$app"
echo "installed $$app"

install -d -m 0700 "$$(dirname "$$config")"
(
  umask 077
  cat >"$$config.tmp" <<'${config_eof}'
${config_json}
${config_eof}
)
mv -f "$$config.tmp" "$$config"
echo "wrote $$config"

install -d -m 0755 "$$root/etc/systemd/system"
install -m 0644 -t "$$root/etc/systemd/system" "$$app/${units_dir}"/*
systemctl daemon-reload
systemctl enable ${boot_service} ${timers}
systemctl start ${timers}
# Not waited for: the lifecycle hook and the journal report the outcome.
systemctl start --no-block ${boot_service}
echo "started ${boot_service}"
"""
)


def render_user_data(
    *, region: str, bucket: str, key: str, sha256: str, config_json: str, watchdog: bool = False
) -> str:
    """Shell commands for ``ec2.UserData.for_linux().add_commands(...)`` (without the ``#!`` line).

    ``region``, ``bucket``, ``key`` and ``config_json`` may be CDK tokens (``Aws.REGION``, the asset's
    bucket and key, ``Stack.to_json_string(config)``); resolved values are checked here. ``sha256`` is
    the bundle's own hash (``BundleInfo.sha256``), known at synth. ``watchdog`` enables and starts the
    watchdog's timer too (the configuration has a ``health_check``).
    """
    _check("region", region, _REGION)
    _check("bucket", bucket, _BUCKET)
    _check("key", key, _KEY)
    if not _SHA256.match(sha256):
        raise ValueError(f"sha256: expected 64 lowercase hex digits, got {sha256!r}")
    if not Token.is_unresolved(config_json):
        try:
            parsed = json.loads(config_json)
        except ValueError as error:
            raise ValueError(f"config_json: not JSON ({error})") from None
        if not isinstance(parsed, dict):
            raise ValueError("config_json: expected a JSON object")
        config_json = json.dumps(parsed, separators=(",", ":"), sort_keys=True)
    return _SCRIPT.substitute(
        region=region,
        bucket=bucket,
        key=key,
        sha256=sha256,
        config_json=config_json,
        config_eof=_CONFIG_EOF,
        install_dir=INSTALL_DIR,
        config_path=CONFIG_PATH,
        log_path=LOG_PATH,
        units_dir=UNITS_ARCDIR,
        boot_service=BOOT_SERVICE,
        timers=f"{TIMER} {WATCHDOG_TIMER}" if watchdog else TIMER,
    )


def payload_user_data(
    scope: Construct,
    *,
    bundle: BundleInfo,
    config: Mapping[str, Any],
    role: iam.IRole,
    into: ec2.UserData | None = None,
) -> ec2.UserData:
    """User data that installs ``bundle`` (as the file asset ``Payload`` under ``scope``) with ``config``.

    ``role`` may read this one object and nothing else in the asset bucket. With ``into``, the commands
    are added to that (a launch template's, created before the configuration could name its group).
    """
    asset = s3_assets.Asset(
        scope,
        "Payload",
        path=str(bundle.path),
        # Keyed by the bytes' own hash: the object the user data verifies is the object it fetches,
        # whichever machine uploaded it.
        asset_hash=bundle.sha256,
        asset_hash_type=AssetHashType.CUSTOM,
    )
    # Not asset.grant_read(): that lists and reads the whole bootstrap bucket, every app's assets.
    role.add_to_principal_policy(
        iam.PolicyStatement(
            sid="ReadThePayload",
            actions=["s3:GetObject"],
            resources=[asset.bucket.arn_for_objects(asset.s3_object_key)],
        )
    )
    user_data = into if into is not None else ec2.UserData.for_linux()
    user_data.add_commands(
        render_user_data(
            region=Aws.REGION,
            bucket=asset.s3_bucket_name,
            key=asset.s3_object_key,
            sha256=bundle.sha256,
            config_json=Stack.of(scope).to_json_string(dict(config)),
            watchdog="health_check" in config,
        )
    )
    return user_data


def _check(name: str, value: str, pattern: re.Pattern[str]) -> None:
    if not Token.is_unresolved(value) and not pattern.match(value):
        raise ValueError(f"{name}: {value!r} does not match {pattern.pattern}")
