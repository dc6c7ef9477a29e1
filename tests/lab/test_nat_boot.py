"""The NAT instances' boot unit script, run for real in a namespace with the real AWS CLI against moto.

What the lab's NAT namespaces cannot show (they hold their address from the start): that the script
turns forwarding on, switches ICMP redirects off on every interface including the stable one that
arrives later, applies the rules, turns the primary interface's source/dest check off, takes the
interface over (from a predecessor too, and not again at a reboot), reports ready only once the address
is up, and marks itself unhealthy and abandons when any step fails.

Every `aws` command the script runs goes through the AWS CLI v1 from PyPI (its own venv,
`.venv/awscli`, see the Makefile): the CLI parses each flag and `--query` and botocore validates the
request against the service model, then moto answers (tests/lab/nat_cloud.py), with the lab's
stand-ins for the calls moto does not serve. A misspelt flag or a bad query fails the boot here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stacks.nat import LINK_LOCAL, STABLE_DEVICE_INDEX, nat_boot_script, nat_network_setup
from tests import netns
from tests.kernel.world import REPO
from tests.lab import nat_cloud

pytestmark = pytest.mark.root

ADDRESS = nat_cloud.STABLE_ADDRESS
AWSCLI = REPO / ".venv" / "awscli" / "bin" / "aws"

# The AWS CLI as the script finds it on PATH: the real CLI, pointed at this test's endpoints.
# attach-network-interface then plays the OS too: the interface appears in the namespace with the
# stable address, as amazon-ec2-net-utils would configure it.
AWS_SHIM = """#!/bin/bash
echo "$*" >>"$STUB_CALLS"
case "$1" in
  ec2) url=http://127.0.0.1:{ec2} ;;
  autoscaling) url=http://127.0.0.1:{autoscaling} ;;
  cloudformation) url=http://127.0.0.1:{cloudformation} ;;
  *) echo "aws shim: no endpoint for $1" >&2; exit 2 ;;
esac
rc=0
"{awscli}" --endpoint-url "$url" "$@" || rc=$?
if [ "$rc" -eq 0 ] && [ "$1 $2" = "ec2 attach-network-interface" ]; then
  ip link add ens6 type veth peer name ens6-peer
  ip link set ens6-peer up
  ip addr add "$STUB_ADDRESS/24" dev ens6
  ip link set ens6 up
fi
exit "$rc"
"""

# IMDSv2 as curl sees it: the token, then files under meta-data/ (a missing path fails as curl -f does).
CURL_SHIM = """#!/bin/sh
for url; do :; done
path="${url#*/latest/}"
[ -f "$STUB_IMDS/$path" ] || exit 22
cat "$STUB_IMDS/$path"
"""


@dataclass
class Boot:
    returncode: int
    output: str
    calls: list[str]
    ns: netns.Netns
    ids: dict[str, str]
    records: Path
    env: list[str]

    def sysctl(self, key: str) -> str:
        return self.ns.run("cat", f"/proc/sys/net/ipv4/{key}").stdout.strip()

    def log(self, name: str) -> list[dict[str, Any]]:
        path = self.records / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def aws(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The real CLI, through the shim, in the namespace (what the script's own calls go through)."""
        return self.ns.run("env", "-i", *self.env, "aws", *args, check=False)

    def interface(self, eni: str) -> dict[str, Any]:
        done = self.aws("ec2", "describe-network-interfaces", "--network-interface-ids", eni)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["NetworkInterfaces"][0]  # type: ignore[no-any-return]

    def verdicts(self) -> list[str]:
        lifecycle = [r["LifecycleActionResult"] for r in self.log("autoscaling.jsonl") if r["status"] == 200]
        signals = [r["Status"] for r in self.log("cloudformation.jsonl") if r["status"] == 200]
        return lifecycle + signals


def _awscli() -> str:
    if not AWSCLI.exists():
        raise RuntimeError(f"{AWSCLI} is missing: run `make setup` (it installs requirements-awscli.txt)")
    return str(AWSCLI)


@pytest.fixture
def boot(tmp_path: Path) -> Iterator[Callable[..., Boot]]:
    """Run the boot script once in a fresh namespace with its own moto; yields a function of the
    world's switches: holder (none, self, other), source_dest_check (on, off), unauthorized actions,
    and an edit of the script's text (default: the shipped script as it is)."""
    with netns.netns("natboot") as ns:

        def run(
            *,
            holder: str = "none",
            source_dest_check: str = "on",
            unauthorized: tuple[str, ...] = (),
            edit: Callable[[str], str] = lambda text: text,
        ) -> Boot:
            records = tmp_path / "cloud"
            records.mkdir()
            ns.popen(
                [
                    "env",
                    f"PYTHONPATH={REPO}",
                    sys.executable,
                    "-m",
                    "tests.lab.nat_cloud",
                    "--dir",
                    str(records),
                    "--holder",
                    holder,
                    "--source-dest-check",
                    source_dest_check,
                    "--unauthorized",
                    *unauthorized,
                ],
                stdout=subprocess.DEVNULL,
                stderr=(tmp_path / "cloud.log").open("wb"),
            )
            deadline = time.monotonic() + 60
            while not (records / "ready").exists():
                assert time.monotonic() < deadline, (tmp_path / "cloud.log").read_text()
                time.sleep(0.1)
            ids = json.loads((records / "cloud.json").read_text())
            imds = tmp_path / "imds"
            for path, value in {
                "api/token": "token",
                "meta-data/instance-id": ids["instance"],
                "meta-data/mac": ids["mac"],
                f"meta-data/network/interfaces/macs/{ids['mac']}/interface-id": ids["primary"],
            }.items():
                (imds / path).parent.mkdir(parents=True, exist_ok=True)
                (imds / path).write_text(value)
            bin_dir = tmp_path / "bin"
            bin_dir.mkdir()
            shims = {
                "aws": AWS_SHIM.replace("{awscli}", _awscli())
                .replace("{ec2}", str(nat_cloud.EC2_PORT))
                .replace("{autoscaling}", str(nat_cloud.AUTOSCALING_PORT))
                .replace("{cloudformation}", str(nat_cloud.CLOUDFORMATION_PORT)),
                "curl": CURL_SHIM,
                "dnf": "#!/bin/sh\nexit 0\n",
                "sleep": "#!/bin/sh\nexit 0\n",
            }
            for name, body in shims.items():
                (bin_dir / name).write_text(body)
                (bin_dir / name).chmod(0o755)
            if holder == "self":
                # A reboot: the OS brings the attached interface up with its address before the unit runs.
                ns.ip("link", "add", "ens6", "type", "veth", "peer", "name", "ens6-peer")
                ns.ip("addr", "add", f"{ADDRESS}/24", "dev", "ens6")
                ns.ip("link", "set", "ens6", "up")
            env_file = tmp_path / "nat.env"
            env_file.write_text(
                "\n".join(
                    [
                        f"REGION={nat_cloud.REGION}",
                        f"ENI={ids['eni']}",
                        f"ADDRESS={ADDRESS}",
                        "GROUP=EipReclaim-Network-nat1",
                        "HOOK=eip-reclaim-nat-launch",
                        "STACK=EipReclaim-Network",
                        "RESOURCE=NatGroupASG",
                        "",
                    ]
                )
            )
            network = tmp_path / "network.sh"
            network.write_text(nat_network_setup("10.0.0.0/16"))
            script = tmp_path / "boot.sh"
            script.write_text(edit(nat_boot_script(env_file=str(env_file), network_script=str(network))))
            calls = tmp_path / "calls"
            env = [
                f"PATH={bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
                f"HOME={tmp_path}",
                f"STUB_CALLS={calls}",
                f"STUB_ADDRESS={ADDRESS}",
                f"STUB_IMDS={imds}",
                "AWS_ACCESS_KEY_ID=testing",
                "AWS_SECRET_ACCESS_KEY=testing",
                f"AWS_DEFAULT_REGION={nat_cloud.REGION}",
                f"AWS_CONFIG_FILE={tmp_path}/no-config",
                f"AWS_SHARED_CREDENTIALS_FILE={tmp_path}/no-credentials",
            ]
            done = subprocess.run(
                ns.argv(["env", "-i", *env, "bash", str(script)]),
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            return Boot(
                done.returncode,
                done.stdout + done.stderr,
                calls.read_text().splitlines() if calls.exists() else [],
                ns,
                ids,
                records,
                env,
            )

        yield run


def commands(calls: list[str]) -> list[str]:
    return [" ".join(c.split()[:2]) for c in calls]


def test_a_first_boot_forwards_takes_the_interface_and_then_reports_ready(boot: Callable[..., Boot]) -> None:
    done = boot()
    assert done.returncode == 0, done.output
    # Forwarding on; no redirects from any interface, the stable one that arrived later included.
    assert done.sysctl("ip_forward") == "1"
    for conf in ("all", "default", "lo", "ens6"):
        assert done.sysctl(f"conf/{conf}/send_redirects") == "0", conf
        assert done.sysctl(f"conf/{conf}/rp_filter") == "2", conf
    # The stack's rules, link-local never forwarded.
    assert f"-A FORWARD -d {LINK_LOCAL} -j DROP" in done.ns.run("iptables", "-S", "FORWARD").stdout
    # Source/dest check off on the primary (by its id), the interface attached at its index, the verdict.
    assert commands(done.calls) == [
        "ec2 describe-network-interfaces",
        "ec2 modify-network-interface-attribute",
        "ec2 describe-network-interfaces",
        "ec2 attach-network-interface",
        "autoscaling complete-lifecycle-action",
        "cloudformation signal-resource",
    ], done.calls
    assert done.interface(done.ids["primary"])["SourceDestCheck"] is False
    attachment = done.interface(done.ids["eni"])["Attachment"]
    assert attachment["InstanceId"] == done.ids["instance"]
    assert attachment["DeviceIndex"] == STABLE_DEVICE_INDEX
    assert done.verdicts() == ["CONTINUE", "SUCCESS"]


@pytest.mark.parametrize("source_dest_check", ["off", "on"])
def test_a_reboot_with_the_interface_attached_keeps_the_nat(
    boot: Callable[..., Boot], source_dest_check: str
) -> None:
    """Every boot after the first finds the stable interface attached: EC2 then refuses the instance-wide
    source/dest check call, so the script sets it on the primary interface by id (or not at all when it
    is already off), attaches nothing, and reports ready. aws-facts: nat-multiple-interfaces-refused,
    nat-imds-primary-interface-id, nat-source-dest-check-by-interface"""
    done = boot(holder="self", source_dest_check=source_dest_check)
    assert done.returncode == 0, done.output
    assert "setup failed" not in done.output
    modified = [c for c in done.calls if "modify-" in c]
    if source_dest_check == "off":
        assert modified == []
    else:
        assert modified == [
            f"ec2 modify-network-interface-attribute --network-interface-id {done.ids['primary']} "
            "--no-source-dest-check"
        ]
    assert not any("attach-network-interface" in c for c in done.calls)
    assert done.interface(done.ids["primary"])["SourceDestCheck"] is False
    assert done.log("autoscaling-health.jsonl") == []
    assert done.verdicts() == ["CONTINUE", "SUCCESS"]


def test_the_stand_in_refuses_the_instance_wide_call_as_ec2_does(boot: Callable[..., Boot]) -> None:
    """The rule the reboot test relies on, through the real CLI.

    aws-facts: nat-multiple-interfaces-refused, stand-in-awscli-moto
    """
    done = boot(holder="self")
    refused = done.aws(
        "ec2", "modify-instance-attribute", "--instance-id", done.ids["instance"], "--no-source-dest-check"
    )
    assert refused.returncode != 0
    assert "InvalidInstanceID" in refused.stderr
    assert "There are multiple interfaces attached to instance" in refused.stderr


def test_the_interface_is_taken_from_a_predecessor_that_still_holds_it(boot: Callable[..., Boot]) -> None:
    done = boot(holder="other")
    assert done.returncode == 0, done.output
    order = commands(done.calls)
    assert order.index("ec2 detach-network-interface") < order.index("ec2 attach-network-interface")
    (detach,) = [c for c in done.calls if "detach-network-interface" in c]
    assert detach.endswith("--force")
    attachment = done.interface(done.ids["eni"])["Attachment"]
    assert attachment["InstanceId"] == done.ids["instance"]
    assert done.verdicts() == ["CONTINUE", "SUCCESS"]


def test_a_nat_whose_setup_fails_marks_itself_unhealthy_and_abandons(boot: Callable[..., Boot]) -> None:
    done = boot(unauthorized=("AttachNetworkInterface",))
    assert done.returncode != 0
    assert "setup failed" in done.output
    (health,) = done.log("autoscaling-health.jsonl")
    assert (health["InstanceId"], health["HealthStatus"]) == (done.ids["instance"], "Unhealthy")
    assert done.verdicts() == ["ABANDON", "FAILURE"]


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        ("--no-source-dest-check", "--no-source-dest-chek"),
        ("'NetworkInterfaces[0].SourceDestCheck'", "'NetworkInterfaces[0.SourceDestCheck'"),
    ],
)
def test_a_misspelt_flag_or_query_fails_the_boot(boot: Callable[..., Boot], good: str, bad: str) -> None:
    """The CLI itself refuses what a stand-in that answers everything accepted: an unknown flag, a
    malformed query. The NAT then never reports ready. aws-facts: stand-in-awscli-moto"""
    assert good in nat_boot_script()
    done = boot(edit=lambda text: text.replace(good, bad))
    assert done.verdicts() != ["CONTINUE", "SUCCESS"], done.output
    refusals = ("Unknown options", "Bad value for --query")
    assert any(refusal in done.output for refusal in refusals), done.output
