"""The VPC lab: namespaces that behave like the VPC, built and always torn down by `build()`.

    internet ns (198.51.100.254 on bridge "inet")
      moto (EC2 API, :5000) <- fault proxy (:8080) ; client probe ; stand-ins for Auto Scaling
      (:8081), CloudFormation SignalResource (:8082), CloudWatch PutMetricData (:8083)
      route 203.0.113.0/24 via the router's uplink
        |                       |                        |
    router ns (uplink .1)    nat-a ns (uplink .11)     nat-b ns (uplink .12)
      IMDS 169.254.169.254     own IMDS (NAT identity)   own IMDS
      gateway: 1:1 NAT of      stack's iptables rules    stack's iptables rules
      the EIP, only for the    ens5 at the NAT address   ens5 at the NAT address
      holder (nft)                |                        |
      br-0 (10.0.0.1) ------------+ br-1 (10.0.1.1) -------+
        |                           |
    instance ns: ens5 at 10.0.x.y, AL2023-shaped routes, service on :80, the real payload
                 (strategy ipv6: also 2001:db8:10:x::y/64, IPv6 default route via the router)
    endpoints ns: 10.0.x.5 on every br-x, forwarding the API ports to the emulators from its own
                  uplink (.20): the interface-endpoints strategy's private way to the APIs

IPv6: the router forwards it for every instance (no gateway rules), between the subnets' /64s
(2001:db8:10:x::/64, router at ::1) and the internet's 2001:db8:ffff::/64, where the emulators also
listen (::254). Each boot chooses a strategy (STRATEGIES): the configuration its user data carries.

The test process reaches the internet namespace's network only through one worker thread that has
joined it (setns is per thread), never by a link from the root namespace.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import http.client
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests import netns
from tests.lab import api, imds, jsonl, router, spec

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
REGION = "ap-southeast-2"
INTERNET_IP = "198.51.100.254"  # the "internet host": API, Auto Scaling stand-in, client
ROUTER_UPLINK_IP = "198.51.100.1"
EIP = "203.0.113.10"
MOTO_PORT = 5000
EC2_URL = f"http://{INTERNET_IP}:{api.EC2_PORT}"
AUTOSCALING_URL = f"http://{INTERNET_IP}:{api.AUTOSCALING_PORT}"
CLOUDFORMATION_URL = f"http://{INTERNET_IP}:{api.CLOUDFORMATION_PORT}"
CLOUDWATCH_URL = f"http://{INTERNET_IP}:{api.CLOUDWATCH_PORT}"
ENDPOINTS = {
    "ec2_endpoint_url": EC2_URL,
    "autoscaling_endpoint_url": AUTOSCALING_URL,
    "cloudformation_endpoint_url": CLOUDFORMATION_URL,
    "cloudwatch_endpoint_url": CLOUDWATCH_URL,
}
# The heal strategies the lab runs (docs/lab.md): the payload's egress and the network it is made for.
POLICY_ROUTE = "policy-route"  # nat-instances, the payload's default: only its marked sockets take the NAT
MAIN_TABLE = "main-table"  # nat-instances: pins, then the main table's default route via the NAT
IPV6 = "ipv6"  # direct + dualstack: EC2 over IPv6 through the router; no NAT
INTERFACE_ENDPOINTS = "interface-endpoints"  # direct: the APIs at a private address in the VPC; no NAT
STRATEGIES = (POLICY_ROUTE, MAIN_TABLE, IPV6, INTERFACE_ENDPOINTS)
# The payload's `egress` under each strategy.
PAYLOAD_EGRESS = {
    POLICY_ROUTE: POLICY_ROUTE,
    MAIN_TABLE: MAIN_TABLE,
    IPV6: "direct",
    INTERFACE_ENDPOINTS: "direct",
}
# IPv6 (documentation space): the VPC's /56, one /64 per subnet (AZ index), the internet's /64.
VPC_IPV6 = ipaddress.IPv6Network("2001:db8:10::/56")
INTERNET_IPV6 = "2001:db8:ffff::254"
ROUTER_UPLINK_IPV6 = "2001:db8:ffff::1"
EC2_URL_IPV6 = f"http://[{INTERNET_IPV6}]:{api.EC2_PORT}"
# The interface endpoints' network interface in each public subnet: AWS reserves base..base+3, the
# synthesized NAT sits at base+4, the lab's instances start at base+10.
ENDPOINT_HOST = 5
# The endpoints' side towards the services: what the API sees as the source of an endpoint's calls.
ENDPOINT_UPLINK_IP = "198.51.100.20"
API_PORTS = (api.EC2_PORT, api.AUTOSCALING_PORT, api.CLOUDFORMATION_PORT, api.CLOUDWATCH_PORT)
ASG_NAME = "lab-service-asg"
ROLE = "lab-service-role"
# Link-local addresses the VPC serves from its router: IMDS, DNS, time.
LINK_LOCAL = ("169.254.169.254", "169.254.169.253", "169.254.169.123")
# AL2023's systemd-networkd installs its DHCP routes at this metric.
DHCP_METRIC = "512"
# A lab run is short; the synthesized 240 s would only make failing scenarios slow.
LAB_DEADLINE_SECONDS = 6
# Auto Scaling's shortest heartbeat timeout (30 s): see Lab.boot.
LAB_HOOK_TIMEOUT_SECONDS = 30
CLONE_NEWNET = 0x40000000
# A route in a table no rule looks up (a documentation address): announced, used by nothing. A route
# monitor is listening once it has reported this one.
MARKER_TABLE = "9"
MARKER = ("192.0.2.255/32", "dev", "lo", "table", MARKER_TABLE)

T = TypeVar("T")


def az_name(index: int) -> str:
    return f"{REGION}{chr(ord('a') + index)}"


def nat_uplink_ip(index: int) -> str:
    return f"198.51.100.{11 + index}"


def ipv6_subnet(az_index: int) -> ipaddress.IPv6Network:
    """The public subnet's /64 in AZ `az_index` (the VPC's /56, subnet number = AZ index)."""
    return next(itertools.islice(VPC_IPV6.subnets(new_prefix=64), az_index, None))


def endpoint_ip(subnet: spec.Subnet) -> str:
    """The interface endpoints' private address in this subnet."""
    return str(subnet.cidr.network_address + ENDPOINT_HOST)


def strategy_endpoints(strategy: str, subnet: spec.Subnet) -> dict[str, str]:
    """Where an instance in `subnet` finds the emulators under `strategy`.

    ipv6: EC2 at the internet host's IPv6 literal (in the lab the endpoint URL wins over botocore's
    dual-stack name); Auto Scaling, CloudFormation and CloudWatch stay on IPv4, reached over the Elastic
    IP after the claim, as on AWS, where they have no dual-stack endpoint. interface-endpoints: all four
    at the endpoint's private address in the instance's own subnet.
    """
    if strategy == IPV6:
        return {**ENDPOINTS, "ec2_endpoint_url": EC2_URL_IPV6}
    if strategy == INTERFACE_ENDPOINTS:
        ports = dict(zip(ENDPOINTS, API_PORTS))
        return {key: f"http://{endpoint_ip(subnet)}:{port}" for key, port in ports.items()}
    return dict(ENDPOINTS)


def _join_netns(name: str) -> None:
    """Move the calling thread (only it) into a namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"lab: {what} not ready after {timeout} s")
        time.sleep(0.02)


@dataclass
class PayloadRun:
    """One run of the payload in an instance namespace."""

    instance_id: str
    started: float
    ended: float
    returncode: int
    stderr: str
    lines: list[tuple[float, str]]

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class RunningPayload:
    proc: subprocess.Popen[bytes]
    started: float
    lines: list[tuple[float, str]]  # (when it arrived, the line): the payload's log as it happened
    reader: threading.Thread


@dataclass
class Instance:
    lab: Lab
    ns: netns.Netns
    instance_id: str
    subnet: spec.Subnet
    private_ip: str
    mac: str
    port: str  # its veth's end on the subnet's bridge in the router namespace
    config_path: Path
    state_dir: Path
    strategy: str = POLICY_ROUTE
    ipv6: str | None = None  # its address in the subnet's /64 (strategy ipv6 only)
    runs: list[PayloadRun] = field(default_factory=list)

    @property
    def access_key_id(self) -> str:
        return str(self.lab.identities[self.private_ip]["access_key_id"])

    def routes(self) -> str:
        """Every IPv4 routing table, as `ip` prints it: what "restored exactly" compares.

        IPv4 only: the kernel adds IPv6 link-local routes on its own schedule after the link is up.
        """
        return self.ns.ip("-4", "route", "show", "table", "all")

    def rules(self) -> str:
        """The IPv4 policy rules (policy-route adds one for the run)."""
        return self.ns.ip("-4", "rule", "show")

    def main_table(self) -> str:
        """The main table in full detail, as sampled during a policy-route run."""
        return self.ns.ip("-d", "-4", "route", "show", "table", "main")

    def ipv6_default(self) -> str:
        return self.ns.ip("-6", "route", "show", "default").strip()

    def host_state(self) -> dict[str, str]:
        """What a run must leave as it found it: every IPv4 table, the rules, the IPv6 default route."""
        return {"routes": self.routes(), "rules": self.rules(), "ipv6 default": self.ipv6_default()}

    def default_route(self) -> str:
        return self.ns.ip("route", "show", "default").strip()

    @contextmanager
    def route_events(self) -> Iterator[list[str]]:
        """Every IPv4 route change the kernel announces in this namespace while the block runs.

        `ip monitor` block-buffers into a pipe (a killed monitor would lose what it saw): it runs
        line-buffered. It is listening once it has reported MARKER, added and removed here first; and it
        has read every change of the block once it reports MARKER's removal a second time (the kernel
        announces changes in order), however slowly a loaded machine schedules it.
        """
        lines: list[str] = []
        monitor = self.ns.popen(["stdbuf", "-oL", "ip", "-4", "monitor", "route"], stdout=subprocess.PIPE)

        def read() -> None:
            assert monitor.stdout is not None
            for raw in monitor.stdout:  # one at a time: the waits below read the list as it grows
                lines.append(raw.decode().rstrip("\n"))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        removed = 0  # how many times the marker was removed here: its removals to wait for

        def marker_removed() -> None:
            nonlocal removed
            self.ns.ip("route", "del", *MARKER)
            removed += 1

        def marker_seen(deleted: bool, times: int = 1) -> bool:
            seen = [x for x in lines if f"table {MARKER_TABLE}" in x and x.startswith("Deleted") == deleted]
            return len(seen) >= times

        try:
            give_up = time.monotonic() + 15
            while True:
                # Added afresh each time: replacing a route with itself announces nothing.
                self.ns.ip("route", "add", *MARKER)
                time.sleep(0.05)
                if marker_seen(deleted=False):
                    break
                marker_removed()
                if time.monotonic() > give_up:
                    raise TimeoutError("lab: ip monitor never reported the marker route")
            marker_removed()
            wait_for(lambda: marker_seen(deleted=True, times=removed), "the marker route's removal")
            events: list[str] = []
            yield events
            self.ns.ip("route", "add", *MARKER)
            marker_removed()
            wait_for(lambda: marker_seen(deleted=True, times=removed), "the block's last change")
        finally:
            os.killpg(monitor.pid, signal.SIGKILL)
            monitor.wait(10)
            reader.join(5)
        events += [x for x in lines if f"table {MARKER_TABLE}" not in x]

    def config(self) -> dict[str, Any]:
        """The configuration this instance's user data carries (its strategy's)."""
        loaded: dict[str, Any] = json.loads(self.config_path.read_text())
        return loaded

    def run_config(self, overrides: dict[str, Any]) -> Path:
        """This instance's configuration with `overrides` (a None value removes the key), for one run."""
        config = self.config()
        for key, value in overrides.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path = self.config_path.with_name(f"{self.instance_id}-config-run{len(self.runs)}.json")
        path.write_text(json.dumps(config, indent=2))
        return path

    def payload_argv(self, *extra: str, config: Path | None = None) -> list[str]:
        path = config or self.config_path
        return [PYTHON, "-m", "bootstrap", "--config", str(path), "--verbose", *extra]

    def payload_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "PYTHONPATH": str(REPO),
            # No host AWS configuration may leak in: credentials come from the lab's IMDS only.
            "HOME": str(self.state_dir),
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "EIP_RECLAIM_STATE_DIR": str(self.state_dir),
        }
        env.update(extra or {})
        return env

    def start_payload(
        self, env: dict[str, str] | None = None, config: dict[str, Any] | None = None
    ) -> RunningPayload:
        """The real payload, in this namespace only; each output line is timestamped as it arrives.

        `config`: keys of the instance's configuration replaced for this run only (e.g. the egress).
        """
        path = self.run_config(config) if config else None
        started = time.monotonic()
        proc = self.ns.popen(
            self.payload_argv(config=path),
            cwd=REPO,
            env=self.payload_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        lines: list[tuple[float, str]] = []

        def read() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        return RunningPayload(proc, started, lines, reader)

    def finish(self, running: RunningPayload, timeout: float = 60) -> PayloadRun:
        returncode = running.proc.wait(timeout=timeout)
        running.reader.join(timeout=5)
        run = PayloadRun(
            instance_id=self.instance_id,
            started=running.started,
            ended=time.monotonic(),
            returncode=returncode,
            stderr="\n".join(line for _t, line in running.lines),
            lines=running.lines,
        )
        self.runs.append(run)
        self.lab.event(
            "payload-exit", instance=self.instance_id, code=returncode, seconds=round(run.seconds, 3)
        )
        return run

    def run_payload(
        self, env: dict[str, str] | None = None, timeout: float = 60, config: dict[str, Any] | None = None
    ) -> PayloadRun:
        self.lab.event(
            "payload-start",
            instance=self.instance_id,
            az=self.subnet.az_index,
            egress=(config or {}).get("egress", self.strategy),
        )
        return self.finish(self.start_payload(env, config), timeout=timeout)


class Lab:
    """A built lab. Made by `build()`; `reset()` returns it to "EIP allocated, nothing booted"."""

    def __init__(self, stack: ExitStack, lab_spec: spec.Spec, directory: Path) -> None:
        self.stack = stack
        self.spec = lab_spec
        self.dir = directory
        self.instances: list[Instance] = []
        self.identities: dict[str, dict[str, Any]] = {}
        self.subnet_ids: dict[str, str] = {}
        self.nats: list[netns.Netns] = []
        self.nat_ids: list[str] = []
        self.allocation_id = ""
        self.timeline: list[dict[str, Any]] = []
        self._host_numbers = itertools.count(10)
        self._ports = itertools.count()
        hook = lab_spec.config.get("lifecycle_hook") or {}
        group = hook.get("auto_scaling_group", spec.AUTO_SCALING_GROUP)
        # The group the user data names, unless CloudFormation would name it at deploy.
        self.asg_name = ASG_NAME if group == spec.AUTO_SCALING_GROUP else str(group)
        self._ec2: Any = None

    # -- the timeline -------------------------------------------------------------------------
    def event(self, what: str, **details: Any) -> None:
        record = {"t": time.monotonic(), "event": what, **details}
        self.timeline.append(record)
        jsonl.append(self.dir / "timeline.jsonl", {"event": what, **details})

    # -- the internet namespace, from the test process ------------------------------------------
    def in_internet(self, fn: Callable[[], T]) -> T:
        """Run fn in the worker thread that lives in the internet namespace."""
        return self._control.submit(fn).result(timeout=60)

    def ec2(self) -> Any:
        """A boto3 EC2 client talking to moto directly (no faults), for the lab's own setup."""
        return self._ec2

    def client_get(self, timeout: float = 2.0) -> str | None:
        """The client in the internet asks the Elastic IP's service; the answering instance id or None."""

        def get() -> str | None:
            connection = http.client.HTTPConnection(EIP, 80, timeout=timeout)
            try:
                connection.request("GET", "/")
                answer = connection.getresponse()
                return answer.read().decode().strip() if answer.status == 200 else None
            except OSError:
                return None
            finally:
                connection.close()

        body = self.in_internet(get)
        self.event("client-probe", ok=body is not None, answered_by=body)
        return body

    def start_probe(self) -> subprocess.Popen[bytes]:
        """The client probing the Elastic IP continuously (every 20 ms) into probe.jsonl."""
        return self.internet.popen(
            [PYTHON, "-m", "tests.lab.probe", "--address", EIP, "--log", str(self.dir / "probe.jsonl")],
            cwd=REPO,
            env=self._daemon_env(),
        )

    def sync_gateway(self) -> None:
        def poke() -> None:
            request = http.client.HTTPConnection(ROUTER_UPLINK_IP, router.SYNC_PORT, timeout=10)
            request.request("POST", "/sync")
            request.getresponse().read()
            request.close()

        self.in_internet(poke)

    def holder(self) -> str | None:
        """The instance moto says holds the Elastic IP."""
        addresses = self.in_internet(lambda: self._ec2.describe_addresses(PublicIps=[EIP])["Addresses"])
        # moto answers an empty InstanceId for an unassociated address.
        return (addresses[0].get("InstanceId") or None) if addresses else None

    # -- logs and switches ----------------------------------------------------------------------
    def ec2_calls(self) -> list[dict[str, Any]]:
        return jsonl.read(self.dir / "ec2.jsonl")

    def lifecycle_calls(self) -> list[dict[str, Any]]:
        return jsonl.read(self.dir / "autoscaling.jsonl")

    def health_calls(self) -> list[dict[str, Any]]:
        """SetInstanceHealth calls the Auto Scaling stand-in received (InstanceId, HealthStatus, ...)."""
        return jsonl.read(self.dir / "autoscaling-health.jsonl")

    def set_target_lifecycle_state(self, instance: Instance, state: str | None) -> None:
        """What IMDS answers at autoscaling/target-lifecycle-state for the instance (None: nothing)."""
        self.identities[instance.private_ip]["target_lifecycle_state"] = (
            state and imds.target_lifecycle_state(state)
        )
        _write_atomically(self.dir / "registry.json", json.dumps(self.identities))
        self.event("target-lifecycle-state", instance=instance.instance_id, state=state)

    def open_lifecycle_action(self, instance: Instance) -> None:
        """Auto Scaling starts another launch action for the instance (a warm pool's: out of the pool)."""
        path = self.dir / "lifecycle-actions.json"
        opened = json.loads(path.read_text()) if path.exists() else {}
        opened[instance.instance_id] = int(opened.get(instance.instance_id, 1)) + 1
        _write_atomically(path, json.dumps(opened))

    def signal_calls(self) -> list[dict[str, Any]]:
        """SignalResource calls the CloudFormation stand-in received (StackName, UniqueId, Status, ...)."""
        return jsonl.read(self.dir / "cloudformation.jsonl")

    def metric_calls(self) -> list[dict[str, Any]]:
        """PutMetricData calls the CloudWatch stand-in received (Namespace, MetricData)."""
        return jsonl.read(self.dir / "cloudwatch.jsonl")

    def imds_log(self, name: str = "router") -> list[dict[str, Any]]:
        return jsonl.read(self.dir / f"{name}-imds.jsonl")

    def set_api_faults(self, **faults: Any) -> None:
        _write_atomically(self.dir / "api-faults.json", json.dumps(faults))

    def set_imds_faults(self, **faults: Any) -> None:
        _write_atomically(self.dir / "router-imds-faults.json", json.dumps(faults))

    def egress_attempts(self) -> set[tuple[str, int]]:
        """(source, destination port) of every new connection the router saw leave for the internet."""
        listing = json.loads(self.router.run("nft", "-j", "list", "set", "ip", "audit", "out").stdout)
        attempts = set()
        for entry in listing["nftables"]:
            for element in entry.get("set", {}).get("elem", []):
                value = element["elem"]["val"] if isinstance(element, dict) and "elem" in element else element
                source, port = value["concat"]
                attempts.add((source, int(port)))
        return attempts

    def set_nat_down(self, index: int, down: bool = True) -> None:
        """The NAT instance stops answering: its subnet interface goes down."""
        self.nats[index].ip("link", "set", "ens5", "down" if down else "up")
        self.event("nat-down" if down else "nat-up", az=index)

    # -- instances ------------------------------------------------------------------------------
    def boot(
        self,
        az_index: int,
        *,
        strategy: str = POLICY_ROUTE,
        launched_after: float | None = None,
        hook_timeout_seconds: int = LAB_HOOK_TIMEOUT_SECONDS,
    ) -> Instance:
        """An instance of the group boots in this AZ's public subnet, with no public IPv4.

        `strategy` (one of STRATEGIES) chooses the configuration its user data carries and, for ipv6,
        gives it an address in the subnet's /64 and an IPv6 default route via the router.
        `hook_timeout_seconds` is the launch hook's window its configuration names.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"lab: unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
        subnet = self.spec.subnets[az_index]
        if launched_after is not None:
            # moto's LaunchTime has one-second resolution: "newer" must be visible in it.
            while int(time.time()) <= int(launched_after):
                time.sleep(0.05)
        # Never reused within a session: the router's neighbour and conntrack entries for an address
        # outlive the instance that had it.
        address = subnet.cidr.network_address + next(self._host_numbers)
        if address >= subnet.cidr.broadcast_address:
            raise RuntimeError(f"lab: no unused address left in {subnet.cidr} for this session")
        private_ip = str(address)

        def launch() -> dict[str, Any]:
            reservation = self._ec2.run_instances(
                ImageId="ami-12c6146b",
                MinCount=1,
                MaxCount=1,
                InstanceType="t4g.micro",
                SubnetId=self.subnet_ids[subnet.key],
                PrivateIpAddress=private_ip,
                TagSpecifications=[
                    {
                        "ResourceType": "instance",
                        "Tags": [
                            {"Key": "aws:autoscaling:groupName", "Value": self.asg_name},
                            {"Key": "eip-reclaim:service", "Value": "lab-service"},
                        ],
                    }
                ],
            )
            return dict(reservation["Instances"][0])

        described = self.in_internet(launch)
        instance_id = described["InstanceId"]
        mac = described["NetworkInterfaces"][0]["MacAddress"]
        ns = self.stack.enter_context(netns.netns(f"i{az_index}"))
        # Never reused: a deleted namespace takes its veth peer with it only asynchronously.
        port = f"i{next(self._ports)}-{az_index}"
        self.router.ip("link", "add", port, "type", "veth", "peer", "name", "ens5", "netns", ns.name)
        self.router.ip("link", "set", port, "master", f"br-{az_index}", "up")
        self._shape_like_al2023(ns, subnet, private_ip, mac)
        ipv6 = None
        if strategy == IPV6:
            # An address from the subnet's /64 and the default route via the router, as DHCPv6 and the
            # router advertisement give them (the lab uses the router's global address, not its fe80::).
            network = ipv6_subnet(az_index)
            ipv6 = str(network.network_address + (int(address) - int(subnet.cidr.network_address)))
            ns.ip("-6", "addr", "add", f"{ipv6}/{network.prefixlen}", "dev", "ens5", "nodad")
            ns.ip(
                "-6", "route", "add", "default", "via", str(network.network_address + 1),
                "dev", "ens5", "proto", "ra", "metric", DHCP_METRIC,
            )  # fmt: skip

        state_dir = self.dir / instance_id
        state_dir.mkdir()
        network_config = {
            POLICY_ROUTE: self.spec.config,
            MAIN_TABLE: {**self.spec.config, "egress": MAIN_TABLE},
            IPV6: spec.network_config(self.spec.config, IPV6),
            INTERFACE_ENDPOINTS: spec.network_config(self.spec.config, INTERFACE_ENDPOINTS),
        }[strategy]
        config = spec.render_config(
            dataclasses.replace(self.spec, config=network_config),
            region=REGION,
            subnet_ids=self.subnet_ids,
            allocation_id=self.allocation_id,
            auto_scaling_group=self.asg_name,
            endpoints=strategy_endpoints(strategy, subnet),
            deadline_seconds=LAB_DEADLINE_SECONDS,
        )
        egress = config.get("egress", POLICY_ROUTE)  # absent: the payload's default
        if egress != PAYLOAD_EGRESS[strategy]:
            raise RuntimeError(f"lab: the config for {strategy} names egress {egress!r}")
        if "lifecycle_hook" in config:
            # The synthesized window (660 s) belongs to the 240 s deadline; the lab's runs are compressed
            # to LAB_DEADLINE_SECONDS, and the host's uptime stands in for the instance's. With Auto
            # Scaling's shortest window no restarted run ever fits: a failed run is final, whatever the
            # host's uptime, and ABANDON is always attempted (a scenario may choose a longer window).
            config["lifecycle_hook"]["timeout_seconds"] = hook_timeout_seconds
        config_path = self.dir / f"{instance_id}-config.json"
        config_path.write_text(json.dumps(config, indent=2))

        self.identities[private_ip] = {
            "instance_id": instance_id,
            "mac": mac,
            "private_ip": private_ip,
            "subnet_id": self.subnet_ids[subnet.key],
            "subnet_cidr": str(subnet.cidr),
            "vpc_cidr": str(self.spec.vpc_cidr),
            "az": az_name(az_index),
            "region": REGION,
            "role": ROLE,
            # Each instance its own key, so the API's log says which instance made a call.
            "access_key_id": "ASIA" + instance_id[2:].upper(),
            "tags": {"aws:autoscaling:groupName": self.asg_name, "eip-reclaim:service": "lab-service"},
        }
        _write_atomically(self.dir / "registry.json", json.dumps(self.identities))

        ready = self.dir / f"{instance_id}-service.ready"
        ns.popen(
            [PYTHON, "-m", "tests.lab.service", "--instance-id", instance_id, "--ready", str(ready)],
            cwd=REPO,
            env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")},
        )
        wait_for(ready.exists, f"service on {instance_id}")
        instance = Instance(
            self, ns, instance_id, subnet, private_ip, mac, port, config_path, state_dir, strategy, ipv6
        )
        self.instances.append(instance)
        self.event("boot", instance=instance_id, az=az_index, ip=private_ip, strategy=strategy)
        return instance

    def _shape_like_al2023(self, ns: netns.Netns, subnet: spec.Subnet, ip: str, mac: str) -> None:
        """ens5 and the routes systemd-networkd installs from DHCP on Amazon Linux 2023."""
        prefix = subnet.cidr.prefixlen
        ns.ip("link", "set", "ens5", "address", mac)
        ns.ip("addr", "add", f"{ip}/{prefix}", "dev", "ens5", "noprefixroute")
        ns.ip("link", "set", "ens5", "up")
        common = ["dev", "ens5", "src", ip, "metric", DHCP_METRIC]
        ns.ip("route", "add", str(subnet.cidr), "proto", "kernel", "scope", "link", *common)
        ns.ip("route", "add", str(subnet.router_ip), "proto", "dhcp", "scope", "link", *common)
        ns.ip("route", "add", str(subnet.resolver_ip), "proto", "dhcp", "scope", "link", *common)
        ns.ip("route", "add", "default", "via", str(subnet.router_ip), "proto", "dhcp", *common)

    def kill(self, instance: Instance) -> None:
        """The instance dies (its host fails): its processes die and its link goes dark at once; the ASG
        terminates it. The namespace itself goes at the next reset: deleting one is seconds of kernel
        work on a 2-core machine, which would slow whatever boots next and is no part of a failover."""
        instance.ns.kill_all()
        self.router.ip("link", "set", instance.port, "down")
        self.in_internet(lambda: self._ec2.terminate_instances(InstanceIds=[instance.instance_id]))
        self.event("killed", instance=instance.instance_id)

    def reset(self) -> None:
        """Back to "the Elastic IP exists, is associated with nothing, nothing booted, no faults"."""
        for instance in self.instances:
            if instance.ns.name in netns.list_namespaces():
                instance.ns.kill_all()
                # The veth goes now, not whenever the kernel gets to the namespace: a socket the payload
                # left in FIN-WAIT-1 (closed after the detour, its FIN now leaves with the wrong source)
                # keeps a deleted namespace alive for minutes.
                self.router.run("ip", "link", "del", instance.port, check=False)
                netns.delete(instance.ns.name)
        ids = [i.instance_id for i in self.instances]
        self.instances.clear()
        for name in ("api-faults.json", "router-imds-faults.json", "lifecycle-actions.json"):
            (self.dir / name).unlink(missing_ok=True)
        for index in range(len(self.nats)):
            self.nats[index].ip("link", "set", "ens5", "up")

        def unassociated_address() -> str:
            if ids:
                self._ec2.terminate_instances(InstanceIds=ids)
            for address in self._ec2.describe_addresses()["Addresses"]:
                if address["PublicIp"] == EIP:
                    if "AssociationId" in address:
                        self._ec2.disassociate_address(AssociationId=address["AssociationId"])
                    return str(address["AllocationId"])
            return str(self._ec2.allocate_address(Domain="vpc", Address=EIP)["AllocationId"])

        self.allocation_id = self.in_internet(unassociated_address)
        self.sync_gateway()
        self.router.run("nft", "flush", "set", "ip", "audit", "out")
        for log in self.dir.glob("*.jsonl"):
            log.write_text("")
        self.timeline.clear()

    def release_eip(self) -> None:
        self.in_internet(lambda: self._ec2.release_address(AllocationId=self.allocation_id))
        self.sync_gateway()
        self.event("eip-released", allocation_id=self.allocation_id)

    # -- building ---------------------------------------------------------------------------------
    router: netns.Netns
    internet: netns.Netns
    endpoints: netns.Netns
    _control: concurrent.futures.ThreadPoolExecutor

    def _build(self) -> None:
        internet = self.internet = self.stack.enter_context(netns.netns("inet"))
        routerns = self.router = self.stack.enter_context(netns.netns("router"))
        self._control = self.stack.enter_context(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=1, initializer=_join_netns, initargs=(internet.name,)
            )
        )
        for ns in (internet, routerns):
            set_sysctls(ns, {"net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0"})

        internet.ip("link", "add", "inet", "type", "bridge")
        internet.ip("addr", "add", f"{INTERNET_IP}/24", "dev", "inet")
        internet.ip("link", "set", "inet", "up")
        internet.ip("route", "add", "203.0.113.0/24", "via", ROUTER_UPLINK_IP)
        # IPv6: the emulators' host has an address on the internet's /64; the VPC's /56 is via the router.
        internet.ip("-6", "addr", "add", f"{INTERNET_IPV6}/64", "dev", "inet", "nodad")
        internet.ip("-6", "route", "add", str(VPC_IPV6), "via", ROUTER_UPLINK_IPV6)

        routerns.ip(
            "link", "add", "uplink", "type", "veth", "peer", "name", "p-router", "netns", internet.name
        )
        internet.ip("link", "set", "p-router", "master", "inet", "up")
        routerns.ip("addr", "add", f"{ROUTER_UPLINK_IP}/24", "dev", "uplink")
        routerns.ip("-6", "addr", "add", f"{ROUTER_UPLINK_IPV6}/64", "dev", "uplink", "nodad")
        routerns.ip("link", "set", "uplink", "up")
        # IPv6 is forwarded for every instance (an internet gateway does not translate IPv6); the
        # gateway's 1:1 NAT and its drop rule are IPv4 only.
        set_sysctls(routerns, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
        for address in LINK_LOCAL:
            routerns.ip("addr", "add", f"{address}/32", "dev", "lo")
        for subnet in self.spec.subnets:
            bridge = f"br-{subnet.az_index}"
            routerns.ip("link", "add", bridge, "type", "bridge")
            routerns.ip("addr", "add", f"{subnet.router_ip}/{subnet.cidr.prefixlen}", "dev", bridge)
            routerns.ip("addr", "add", f"{subnet.resolver_ip}/32", "dev", bridge)
            network = ipv6_subnet(subnet.az_index)
            routerns.ip("-6", "addr", "add", f"{network.network_address + 1}/64", "dev", bridge, "nodad")
            routerns.ip("link", "set", bridge, "up")

        self._spawn(internet, [PYTHON, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(MOTO_PORT)], "moto")
        self._spawn(
            internet,
            [
                PYTHON,
                "-m",
                "tests.lab.api",
                "--dir",
                str(self.dir),
                "--moto-port",
                str(MOTO_PORT),
                "--sync-url",
                f"http://{ROUTER_UPLINK_IP}:{router.SYNC_PORT}/sync",
            ],
            "api",
        )
        self._spawn_router(
            routerns,
            "router",
            "--moto-url",
            f"http://{INTERNET_IP}:{MOTO_PORT}/",
            "--region",
            REGION,
            "--sync-address",
            ROUTER_UPLINK_IP,
        )

        def control_client() -> Any:
            import boto3  # type: ignore[import-untyped]

            return boto3.client(
                "ec2",
                endpoint_url=f"http://127.0.0.1:{MOTO_PORT}",
                region_name=REGION,
                aws_access_key_id="lab-control",
                aws_secret_access_key="lab-control",
            )

        self._ec2 = self.in_internet(control_client)
        wait_for(lambda: self.in_internet(_moto_up), "moto", timeout=30)
        self._register_vpc()
        for subnet in self.spec.subnets:
            self._build_nat(subnet)
        self._build_endpoints()
        wait_for(
            lambda: (self.dir / "router.ready").exists() and (self.dir / "api.ready").exists(),
            "router and API daemons",
            timeout=30,
        )
        wait_for(
            lambda: all((self.dir / f"nat{s.az_index}.ready").exists() for s in self.spec.subnets),
            "NAT IMDS",
            timeout=30,
        )
        self.reset()

    def _spawn(self, ns: netns.Netns, argv: list[str], name: str) -> None:
        """A lab daemon in a namespace, its output in <name>.log (it dies with the namespace)."""
        with (self.dir / f"{name}.log").open("wb") as log:
            ns.popen(argv, cwd=REPO, env=self._daemon_env(), stdout=log, stderr=subprocess.STDOUT)

    def _spawn_router(self, ns: netns.Netns, name: str, *args: str) -> None:
        """The IMDS (and, in the router namespace, the gateway) daemon of `tests.lab.router`."""
        self._spawn(
            ns, [PYTHON, "-m", "tests.lab.router", "--dir", str(self.dir), "--name", name, *args], name
        )

    def _daemon_env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")}

    def _register_vpc(self) -> None:
        def register() -> dict[str, str]:
            vpc = self._ec2.create_vpc(CidrBlock=str(self.spec.vpc_cidr))["Vpc"]["VpcId"]
            ids = {}
            for subnet in self.spec.subnets:
                created = self._ec2.create_subnet(
                    VpcId=vpc,
                    CidrBlock=str(subnet.cidr),
                    AvailabilityZone=az_name(subnet.az_index),
                )
                ids[subnet.key] = created["Subnet"]["SubnetId"]
            return ids

        self.subnet_ids = self.in_internet(register)

    def _uplink(self, ns: netns.Netns, port: str, address: str) -> None:
        """A veth from `ns` (its end named uplink, at `address`/24) to the internet namespace's bridge."""
        ns.ip("link", "add", "uplink", "type", "veth", "peer", "name", port, "netns", self.internet.name)
        self.internet.ip("link", "set", port, "master", "inet", "up")
        ns.ip("addr", "add", f"{address}/24", "dev", "uplink")
        ns.ip("link", "set", "uplink", "up")

    def _build_nat(self, subnet: spec.Subnet) -> None:
        """A NAT instance: its stable address on the subnet, an uplink, the stack's own rules, its IMDS."""
        index = subnet.az_index
        ns = self.stack.enter_context(netns.netns(f"nat{index}"))
        self.nats.append(ns)
        port = f"n-{index}"
        self.router.ip("link", "add", port, "type", "veth", "peer", "name", "ens5", "netns", ns.name)
        self.router.ip("link", "set", port, "master", f"br-{index}", "up")
        ns.ip("addr", "add", f"{subnet.nat_ip}/{subnet.cidr.prefixlen}", "dev", "ens5")
        ns.ip("link", "set", "ens5", "up")
        ns.ip("route", "add", str(self.spec.vpc_cidr), "via", str(subnet.router_ip))
        self._uplink(ns, f"p-nat{index}", nat_uplink_ip(index))
        ns.ip("route", "add", "default", "via", INTERNET_IP)
        # The NAT instances' own setup text (forwarding, redirects, rp_filter, the packet filter), as
        # their boot unit runs it at every boot.
        ns.run("sh", "-c", nat_setup(str(self.spec.vpc_cidr)))
        for address in LINK_LOCAL:
            ns.ip("addr", "add", f"{address}/32", "dev", "lo")

        def launch() -> str:
            reservation = self._ec2.run_instances(
                ImageId="ami-12c6146b",
                MinCount=1,
                MaxCount=1,
                SubnetId=self.subnet_ids[subnet.key],
                PrivateIpAddress=str(subnet.nat_ip),
            )
            return str(reservation["Instances"][0]["InstanceId"])

        nat_id = self.in_internet(launch)
        self.nat_ids.append(nat_id)
        identity = {
            "instance_id": nat_id,
            "mac": f"02:00:00:00:00:{index:02x}",
            "private_ip": str(subnet.nat_ip),
            "subnet_id": self.subnet_ids[subnet.key],
            "subnet_cidr": str(subnet.cidr),
            "vpc_cidr": str(self.spec.vpc_cidr),
            "az": az_name(index),
            "region": REGION,
            "role": "lab-nat-role",
            "access_key_id": "ASIANAT" + nat_id[2:].upper(),
        }
        self._spawn_router(ns, f"nat{index}", "--fixed-identity", json.dumps(identity))

    def _build_endpoints(self) -> None:
        """Interface endpoints: an address in every public subnet (ENDPOINT_HOST) at which the emulators
        answer, as EC2, Auto Scaling, CloudFormation and CloudWatch endpoints in the VPC do. The
        namespace forwards those ports to the emulators from its own uplink (ENDPOINT_UPLINK_IP): the
        instance's connection never leaves the VPC through the router, and needs no NAT instance.
        """
        ns = self.endpoints = self.stack.enter_context(netns.netns("endpoints"))
        addresses = []
        for subnet in self.spec.subnets:
            address = endpoint_ip(subnet)
            if address == str(subnet.nat_ip):
                raise RuntimeError(f"lab: the endpoint address {address} is the NAT's in the synth")
            port, inside = f"e-{subnet.az_index}", f"ens{5 + subnet.az_index}"
            self.router.ip("link", "add", port, "type", "veth", "peer", "name", inside, "netns", ns.name)
            self.router.ip("link", "set", port, "master", f"br-{subnet.az_index}", "up")
            ns.ip("addr", "add", f"{address}/{subnet.cidr.prefixlen}", "dev", inside)
            ns.ip("link", "set", inside, "up")
            addresses.append(address)
        self._uplink(ns, "p-endpoints", ENDPOINT_UPLINK_IP)
        set_sysctls(
            ns,
            {
                "net.ipv4.ip_forward": "1",
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
            },
        )
        ports = ", ".join(str(p) for p in API_PORTS)
        ns.run(
            "nft",
            "-f",
            "-",
            input=(
                "table ip endpoints {\n"
                "  chain pre {\n    type nat hook prerouting priority dstnat; policy accept;\n"
                f"    ip daddr {{ {', '.join(addresses)} }} tcp dport {{ {ports} }} dnat to {INTERNET_IP}\n"
                "  }\n"
                "  chain post {\n    type nat hook postrouting priority srcnat; policy accept;\n"
                '    oifname "uplink" masquerade\n'
                "  }\n}\n"
            ),
        )


def set_sysctls(ns: netns.Netns, values: dict[str, str]) -> None:
    """Network sysctls of one namespace only (/proc/sys/net is the writer's namespace's), without
    depending on procps being installed."""
    script = "".join(f"echo {v} > /proc/sys/{k.replace('.', '/')}\n" for k, v in values.items())
    ns.run("sh", "-ec", script)


def nat_setup(vpc_cidr: str) -> str:
    """The NAT boot unit's setup text (sysctls and the packet filter), exactly as synthesized."""
    from stacks.nat import nat_network_setup

    return nat_network_setup(vpc_cidr)


def _moto_up() -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", MOTO_PORT, timeout=1)
        connection.request("GET", "/moto-api/")
        connection.getresponse().read()
        connection.close()
        return True
    except OSError:
        return False


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _unwind_in(owner: int) -> Callable[[int, Any], None]:
    """A SIGTERM handler: in the process that built the lab, unwind like Ctrl-C (CI cancelling), so the
    finally blocks delete everything; in a forked copy of it, exit at once.

    pyroute2's `IPRoute(netns=...)` forks a helper that makes the socket in the namespace, hands it over,
    and is then stopped with SIGTERM. A helper still alive by then inherits this handler: unwinding, it
    ran the copied stack's finally blocks — this lab's teardown — and SIGKILLed the parent's `ip monitor`
    mid-test (seen under load: no route event at all, the monitor dead with -9).
    """

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    return handler


@contextmanager
def build(lab_spec: spec.Spec | None = None) -> Iterator[Lab]:
    """Build the lab; however the block ends (failure, Ctrl-C), kill its processes and delete it all."""
    if not netns.can_run():
        raise PermissionError(netns.HOW_TO_RUN)
    directory = Path(tempfile.mkdtemp(prefix="eip-reclaim-lab-"))
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _unwind_in(os.getpid()))
    try:
        with ExitStack() as stack:
            lab = Lab(stack, lab_spec or spec.load(), directory)
            lab._build()
            yield lab
    finally:
        signal.signal(signal.SIGTERM, previous)
        if os.environ.get("EIP_RECLAIM_LAB_KEEP"):
            print(f"lab files kept in {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
