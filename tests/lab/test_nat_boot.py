"""The NAT instances' boot unit script, run for real in a namespace with a stubbed AWS CLI and IMDS.

What the lab's NAT namespaces cannot show (they hold their address from the start): that the script
turns forwarding on, switches ICMP redirects off on every interface including the stable one that
arrives later, applies the rules, takes the interface over (from a predecessor too), reports ready
only once the address is up, and marks itself unhealthy and abandons when any step fails.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stacks.nat import LINK_LOCAL, STABLE_DEVICE_INDEX, nat_boot_script, nat_network_setup
from tests import netns

pytestmark = pytest.mark.root

ADDRESS = "10.0.0.4"
INSTANCE = "i-0123456789abcdef0"
ENI = "eni-0123456789abcdef0"

# The AWS CLI as the script uses it. attach-network-interface plays EC2 and the OS together: the
# interface appears in the namespace with the stable address, as amazon-ec2-net-utils would configure it.
AWS_STUB = """#!/bin/bash
echo "$*" >>"$STUB_CALLS"
case "$1 $2" in
  "ec2 describe-network-interfaces")
    if [ -n "${STUB_HOLDER:-}" ]; then
      printf '%s\\t%s\\n' "$STUB_HOLDER" eni-attach-0old
    else
      echo None
    fi ;;
  "ec2 attach-network-interface")
    if [ "${STUB_FAIL:-}" = attach ]; then echo "UnauthorizedOperation" >&2; exit 254; fi
    ip link add ens6 type veth peer name ens6-peer
    ip link set ens6-peer up
    ip addr add "$STUB_ADDRESS/24" dev ens6
    ip link set ens6 up ;;
esac
"""


@dataclass
class Boot:
    returncode: int
    output: str
    calls: list[str]
    ns: netns.Netns

    def sysctl(self, key: str) -> str:
        return self.ns.run("cat", f"/proc/sys/net/ipv4/{key}").stdout.strip()


@pytest.fixture
def boot(tmp_path: Path) -> Iterator[Callable[..., Boot]]:
    """Run the boot script once in a fresh namespace; yields a function of the stub's switches."""
    with netns.netns("natboot") as ns:

        def run(**switches: str) -> Boot:
            bin_dir = tmp_path / "bin"
            bin_dir.mkdir(exist_ok=True)
            for name, body in {
                "aws": AWS_STUB,
                "curl": f'#!/bin/sh\necho "{INSTANCE}"\n',
                "dnf": "#!/bin/sh\nexit 0\n",
                "sleep": "#!/bin/sh\nexit 0\n",
            }.items():
                (bin_dir / name).write_text(body)
                (bin_dir / name).chmod(0o755)
            env_file = tmp_path / "nat.env"
            env_file.write_text(
                "\n".join(
                    [
                        "REGION=ap-southeast-2",
                        f"ENI={ENI}",
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
            script.write_text(nat_boot_script(env_file=str(env_file), network_script=str(network)))
            calls = tmp_path / "calls"
            env = [
                f"PATH={bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
                f"STUB_CALLS={calls}",
                f"STUB_ADDRESS={ADDRESS}",
                *(f"STUB_{k.upper()}={v}" for k, v in switches.items()),
            ]
            done = subprocess.run(
                ns.argv(["env", "-i", *env, "bash", str(script)]),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            return Boot(
                done.returncode,
                done.stdout + done.stderr,
                calls.read_text().splitlines() if calls.exists() else [],
                ns,
            )

        yield run


def verdicts(calls: list[str]) -> list[str]:
    return [
        c.split()[-1] if "complete-lifecycle-action" in c else c.split("--status ")[1].split()[0]
        for c in calls
        if "complete-lifecycle-action" in c or "signal-resource" in c
    ]


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
    # Source/dest check off on the primary, the interface attached at its index, then the verdict.
    actions = [" ".join(c.split()[:2]) for c in done.calls]
    assert actions == [
        "ec2 modify-instance-attribute",
        "ec2 describe-network-interfaces",
        "ec2 attach-network-interface",
        "autoscaling complete-lifecycle-action",
        "cloudformation signal-resource",
    ], done.calls
    assert (
        f"--network-interface-id {ENI} --instance-id {INSTANCE} --device-index {STABLE_DEVICE_INDEX}"
        in (done.calls[2])
    )
    assert "--no-source-dest-check" in done.calls[0]
    assert verdicts(done.calls) == ["CONTINUE", "SUCCESS"]


def test_the_interface_is_taken_from_a_predecessor_that_still_holds_it(boot: Callable[..., Boot]) -> None:
    done = boot(holder="i-0fedcba9876543210")
    assert done.returncode == 0, done.output
    detach = [c for c in done.calls if "detach-network-interface" in c]
    assert detach == ["ec2 detach-network-interface --attachment-id eni-attach-0old --force"]
    order = [c.split()[1] for c in done.calls]
    assert order.index("detach-network-interface") < order.index("attach-network-interface")
    assert verdicts(done.calls) == ["CONTINUE", "SUCCESS"]


def test_a_nat_whose_setup_fails_marks_itself_unhealthy_and_abandons(boot: Callable[..., Boot]) -> None:
    done = boot(fail="attach")
    assert done.returncode != 0
    assert "setup failed" in done.output
    assert any("set-instance-health" in c and "--health-status Unhealthy" in c for c in done.calls)
    assert verdicts(done.calls) == ["ABANDON", "FAILURE"]
