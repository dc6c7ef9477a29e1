"""A subnet in namespaces, shaped like Amazon Linux 2023 on EC2, for running the real payload.

    instance (10.0.0.10, interface ens5) --+
    router   (10.0.0.1, IMDS at 169.254.169.254)  --+-- bridge (lan namespace)
    nat      (10.0.0.4, the API at 203.0.113.10, its own IMDS) --+

The router does not forward: the API is reachable only with the default route via the NAT, which is
what the payload's detour must arrange. The NAT answers 169.254.169.254 with its own identity, so a
missing pin shows as a wrong instance-id rather than as a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import netns

REPO = Path(__file__).resolve().parents[2]
IFNAME = "ens5"
MAC = "02:00:0a:00:00:0a"
ADDRESS = "10.0.0.10"
ROUTER = "10.0.0.1"
NAT = "10.0.0.4"
API = "203.0.113.10"
SUBNET_ID = "subnet-0aaa"
SUBNET_CIDR = "10.0.0.0/24"
VPC_CIDR = "10.0.0.0/16"
NAT_INSTANCE_ID = "i-0000000000000a7a7"

# Set both to run these tests against an unpacked bundle (python -m stacks.bundle) under the instance's
# interpreter, e.g. python3.9: the payload then starts as the systemd unit starts it (python3 -S).
PAYLOAD_PYTHON_ENV = "EIP_RECLAIM_TEST_PAYLOAD_PYTHON"
PAYLOAD_PATH_ENV = "EIP_RECLAIM_TEST_PAYLOAD_PATH"


def _payload_argv() -> list[str]:
    python = os.environ.get(PAYLOAD_PYTHON_ENV)
    return [python, "-S", "-m", "bootstrap"] if python else [sys.executable, "-m", "bootstrap"]


# Amazon Linux 2023's systemd-networkd routes after DHCP on the primary interface.
AL2023_ROUTES = [
    f"10.0.0.0/24 dev {IFNAME} proto kernel scope link src {ADDRESS} metric 512",
    f"{ROUTER} dev {IFNAME} proto dhcp scope link src {ADDRESS} metric 512",
    f"10.0.0.2 via {ROUTER} dev {IFNAME} proto dhcp src {ADDRESS} metric 512",
    f"default via {ROUTER} dev {IFNAME} proto dhcp src {ADDRESS} metric 512",
]


@dataclass
class World:
    inst: netns.Netns
    router: netns.Netns
    nat: netns.Netns
    tmp: Path
    ids: dict[str, str] = field(default_factory=dict)
    moto: subprocess.Popen[bytes] | None = None
    # How the payload is started: this checkout under the test interpreter, unless the environment
    # (above) or a benchmark points it at an unpacked bundle and the instance's interpreter.
    payload_argv: list[str] = field(default_factory=_payload_argv)
    payload_path: str | None = field(default_factory=lambda: os.environ.get(PAYLOAD_PATH_ENV))

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    @property
    def journal(self) -> Path:
        return self.state_dir / "routes.json"

    def routes(self, table: str = "main") -> list[dict[str, Any]]:
        """The full detailed dump of a routing table of the instance, as `ip -j -d` prints it."""
        text = self.inst.ip("-j", "-d", "route", "show", "table", table)
        dump: list[dict[str, Any]] = json.loads(text or "[]")
        return dump

    def all_routes(self) -> list[dict[str, Any]]:
        return self.routes("all")

    def defaults(self) -> list[dict[str, Any]]:
        return [r for r in self.routes() if r["dst"] == "default"]

    def seed(self, *args: str) -> str:
        done = self.nat.run(sys.executable, "-m", "tests.kernel.seed", f"http://{API}", *args, timeout=60)
        return done.stdout.strip()

    def holder(self) -> str:
        return self.seed("holder", self.ids["allocation_id"])

    def config(self, **overrides: Any) -> Path:
        document: dict[str, Any] = {
            "version": 1,
            "region": "us-east-1",
            "allocation_id": self.ids["allocation_id"],
            "nat_by_subnet": {SUBNET_ID: NAT, "subnet-0bbb": "10.0.1.4"},
            "deadline_seconds": 20,
            "ec2_endpoint_url": f"http://{API}",
            "test": True,
            # The kernel tests of the detour itself; test_egress.py runs the default, policy-route.
            "egress": "main-table",
        }
        document.update(overrides)
        document = {k: v for k, v in document.items() if v is not None}  # None: leave the key out
        path = self.tmp / f"config-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(document))
        return path

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "EIP_RECLAIM_STATE_DIR": str(self.state_dir),
            # Hermetic: no profile or credentials file of the machine running the tests.
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "PYTHONDONTWRITEBYTECODE": "1",
            # Ten minutes after boot, whenever this host booted: the first boot's IAM grace is over.
            "EIP_RECLAIM_TEST_UPTIME": "600",
        }
        env.update(extra)
        return env

    def start_payload(
        self, config: Path, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """The real payload, `python -m bootstrap`, inside the instance namespace."""
        env = dict(env or self.env())
        if self.payload_path:
            env["PYTHONPATH"] = self.payload_path
        return self.inst.popen(  # type: ignore[return-value]
            [*self.payload_argv, "--config", str(config), *extra],
            cwd=self.payload_path or str(REPO),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run_payload(
        self, config: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> tuple[int, str, str]:
        proc = self.start_payload(config, *extra, env=env)
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err

    def pause_api(self) -> None:
        assert self.moto is not None
        os.kill(self.moto.pid, signal.SIGSTOP)

    def resume_api(self) -> None:
        assert self.moto is not None
        os.kill(self.moto.pid, signal.SIGCONT)

    def stop_mid_detour(self, config: Path) -> tuple[int, str]:
        """Start a run, hold the API so it sits in the detour, SIGTERM it there; (exit code, stderr)."""
        self.pause_api()
        proc = self.start_payload(config)
        try:
            self.wait_for_detour()
            os.kill(proc.pid, signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            self.resume_api()
        return proc.returncode, err

    def kill_mid_detour(self, config: Path, *, before_kill: Callable[[], None] = lambda: None) -> None:
        """Start a run, hold the API so it sits in the detour, SIGKILL it there (after `before_kill`)."""
        self.pause_api()
        proc = self.start_payload(config)
        try:
            self.wait_for_detour()
            before_kill()
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
        finally:
            self.resume_api()

    def wait_for_detour(self, timeout: float = 15) -> list[dict[str, Any]]:
        """Poll from outside until the default route goes via the NAT; return the table then."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            table = self.routes()
            if any(r["dst"] == "default" and r.get("gateway") == NAT for r in table):
                return table
            time.sleep(0.02)
        raise AssertionError(f"no detour via {NAT} within {timeout} s: {self.routes()}")


def _identity(instance_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "instance_id": instance_id,
        "mac": MAC,
        "subnet_id": SUBNET_ID,
        "subnet_cidr": SUBNET_CIDR,
        "vpc_cidrs": [VPC_CIDR],
        "public_ipv4": None,
        "role": "eip-reclaim-test",
        **extra,
    }


def _start_imds(ns: netns.Netns, tmp: Path, name: str, identity: dict[str, Any]) -> None:
    path = tmp / f"imds-{name}.json"
    path.write_text(json.dumps(identity))
    proc = ns.popen(
        [
            sys.executable,
            "-m",
            "tests.kernel.fake_imds",
            "--host",
            "169.254.169.254",
            "--identity",
            str(path),
            "--log",
            str(tmp / f"imds-{name}.log"),
        ],
        cwd=str(REPO),
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready", f"IMDS in {ns.name} did not start"


def _link(lan: netns.Netns, port: str, peer_ns: netns.Netns, peer_name: str) -> None:
    lan.ip("link", "add", port, "type", "veth", "peer", "name", peer_name, "netns", peer_ns.name)
    lan.ip("link", "set", port, "master", "br0", "up")


@contextmanager
def world(tmp: Path, **imds_extra: Any) -> Iterator[World]:
    """Build the subnet, start moto (in the NAT) and both IMDS; yield; everything goes away after."""
    with ExitStack() as stack:
        lan = stack.enter_context(netns.netns("lan"))
        inst = stack.enter_context(netns.netns("inst"))
        router = stack.enter_context(netns.netns("rtr"))
        nat = stack.enter_context(netns.netns("nat"))
        lan.ip("link", "add", "br0", "type", "bridge")
        lan.ip("link", "set", "br0", "up")
        _link(lan, "p-inst", inst, IFNAME)
        _link(lan, "p-rtr", router, "eth0")
        _link(lan, "p-nat", nat, "eth0")

        inst.ip("link", "set", IFNAME, "address", MAC, "up")
        inst.ip("addr", "add", f"{ADDRESS}/24", "dev", IFNAME, "noprefixroute")
        for route in AL2023_ROUTES:
            inst.ip("route", "add", *route.split())

        for ns, address in ((router, ROUTER), (nat, NAT)):
            ns.ip("link", "set", "eth0", "up")
            ns.ip("addr", "add", f"{address}/24", "dev", "eth0")
            ns.ip("addr", "add", "169.254.169.254/32", "dev", "lo")
        nat.ip("addr", "add", f"{API}/32", "dev", "lo")

        w = World(inst=inst, router=router, nat=nat, tmp=tmp)
        w.moto = nat.popen(
            [sys.executable, "-m", "moto.server", "-H", API, "-p", "80"],
            cwd=str(REPO),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        w.ids = json.loads(w.seed("setup"))
        _start_imds(router, tmp, "router", _identity(w.ids["self"], **imds_extra))
        _start_imds(nat, tmp, "nat", _identity(NAT_INSTANCE_ID))
        yield w
        # Never leave a stopped process behind: it would keep its namespace from being deleted cleanly.
        if w.moto.poll() is None:
            os.kill(w.moto.pid, signal.SIGCONT)
