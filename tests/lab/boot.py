"""Lab instances that boot: a systemd-nspawn container, whose init is this machine's systemd, per instance.

A container joins its instance's namespace (`--network-namespace-path=`), so it sees the same ens5,
routes and IMDS as the lab's other instances. Its root is a directory of its own — the disk that
survives a power-off — with the machine's `/usr` under an overlay (writable, its writes kept with the
disk) that adds Amazon Linux 2023's Python 3.9 when this machine has one, and the AWS CLI. Its first
boot runs the user data of the synthesized launch template, with only deploy-time values filled in,
once, as root, as cloud-init's final stage would; from then on only systemd starts the payload.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import netns
from tests.kernel.bundled import find_python39
from tests.lab import spec, vpc

# Where the S3 stand-in answers: an address on the router's loopback, reached through the VPC router as
# an S3 gateway endpoint's prefix is (TEST-NET-1: the lab's own, nothing outside answers it).
S3_IP = "192.0.2.80"
S3_PORT = 80
S3_URL = f"http://{S3_IP}:{S3_PORT}"
# moto's default account: the CDK bootstrap bucket's name carries it.
ACCOUNT = "123456789012"
# The heredoc that carries the configuration in the user data (stacks.user_data._CONFIG_EOF).
CONFIG_HEREDOC = re.compile(r"(<<'(?P<eof>[A-Z_]+)'\n)(?P<body>\{.*?\})(\n(?P=eof)\n)", re.S)
BUNDLE_URL = re.compile(r"bundle_url='s3://(?P<bucket>[^/']+)/(?P<key>[^']+)'")

BOOT_SERVICE = "eip-reclaim.service"
RECHECK_SERVICE = "eip-reclaim-recheck.service"
# The lab's stand-in for cloud-init's final stage ("scripts-user"): the user data, once per instance.
CLOUD_FINAL = "lab-cloud-final.service"
USER_DATA = "/var/lib/cloud/instance/scripts/part-001"
USER_DATA_DONE = "/var/lib/cloud/instance/sem/config_scripts_user"
# Once per instance, whatever its outcome: cloud-init does not run the user data again at a reboot.
RUN_USER_DATA = "/var/lib/cloud/run-user-data"
RUN_USER_DATA_SCRIPT = f"""#!/bin/sh
mkdir -p {os.path.dirname(USER_DATA_DONE)}
{USER_DATA}
code=$?
touch {USER_DATA_DONE}
exit $code
"""
CLOUD_FINAL_UNIT = f"""\
# The lab's stand-in for cloud-init's final stage: runs the user data once per instance, as root, after
# the network is up and the system has booted (cloud-final.service is ordered after multi-user.target).
[Unit]
Description=lab: the instance's user data, once, as cloud-init runs it
Wants=network-online.target
After=network-online.target multi-user.target
ConditionPathExists=!{USER_DATA_DONE}

[Service]
Type=oneshot
# The S3 gateway endpoint's part: on AWS the CLI's regional endpoint is reached through the VPC's
# route to S3; here the AWS CLI is pointed at the lab's S3 stand-in.
Environment=AWS_ENDPOINT_URL_S3={S3_URL}
Environment=HOME=/root
ExecStart={RUN_USER_DATA}
TimeoutSec=0
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""

_names = itertools.count()


@dataclass(frozen=True)
class Image:
    """What every lab container is made of: the user data (deploy-time values still open), the bundle
    asset it fetches, the /usr layer and the host paths the containers bind read-only."""

    user_data: str  # the synthesized text; the configuration's heredoc is filled per instance
    bucket: str
    key: str
    asset: Path  # the bundle as `cdk deploy` would upload it
    usr_layer: Path  # laid over the machine's /usr: python3 (3.9 if any) and the aws command
    binds: tuple[str, ...]  # host directories the aws command needs, bound read-only at the same path
    python: str  # what /usr/bin/python3 is in the containers, for reports

    def user_data_for(self, config: dict[str, Any]) -> str:
        """The user data with this instance's configuration (the lab's rendering of the synth's)."""
        text, count = CONFIG_HEREDOC.subn(
            lambda m: m.group(1) + json.dumps(config, separators=(",", ":"), sort_keys=True) + m.group(4),
            self.user_data,
        )
        if count != 1:
            raise RuntimeError("lab: the user data carries no configuration heredoc")
        return text


def make_image(synth_dir: Path, work: Path) -> Image:
    """The image from a real synth of the default app (written to `synth_dir`)."""
    templates = [json.loads(p.read_text()) for p in sorted(synth_dir.glob("*.template.json"))]
    resources = {k: v for t in templates for k, v in t.get("Resources", {}).items()}
    user_data = [
        r["Properties"]["LaunchTemplateData"]["UserData"]
        for r in resources.values()
        if r["Type"] == "AWS::EC2::LaunchTemplate" and "nat_by_subnet" in json.dumps(r["Properties"])
    ]
    if not user_data:
        raise RuntimeError("lab: no launch template carries the payload's user data")
    text, intrinsics = spec._flatten(user_data[0])
    # What CloudFormation fills in at deploy: the region and the bootstrap bucket's name.
    for placeholder, value in intrinsics.items():
        if value == {"Ref": "AWS::Region"}:
            text = text.replace(placeholder, vpc.REGION)
        elif "Fn::Sub" in value and isinstance(value["Fn::Sub"], str):
            name = (
                value["Fn::Sub"].replace("${AWS::AccountId}", ACCOUNT).replace("${AWS::Region}", vpc.REGION)
            )
            text = text.replace(placeholder, name)
    url = BUNDLE_URL.search(text)
    if url is None or "@@cfn" in url.group(0):
        raise RuntimeError("lab: cannot read the bundle's S3 location from the user data")
    assets = list(synth_dir.glob(f"asset.{url.group('key').removesuffix('.zip')}*"))
    if len(assets) != 1:
        raise RuntimeError(f"lab: the synth holds no asset for {url.group('key')}")
    layer, python = _usr_layer(work / "usr")
    return Image(
        user_data=text,
        bucket=url.group("bucket"),
        key=url.group("key"),
        asset=assets[0],
        usr_layer=layer,
        binds=_aws_binds(),
        python=python,
    )


def aws_cli() -> Path:
    """The AWS CLI the containers run (the checkout's `.venv/awscli`, made by the Makefile)."""
    aws = spec.REPO / ".venv" / "awscli" / "bin" / "aws"
    if not aws.exists():
        raise RuntimeError(f"lab: no AWS CLI at {aws}: create it with `make setup`")
    return aws


def _aws_binds() -> tuple[str, ...]:
    """The AWS CLI's venv and its base interpreter's prefix, unless that is the machine's /usr."""
    venv = aws_cli().parent.parent.resolve()
    home = ""
    for line in (venv / "pyvenv.cfg").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            home = value.strip()
    binds = [str(venv)]
    prefix = Path(home).resolve().parent if home else None
    if prefix is not None and not str(prefix).startswith("/usr"):
        binds.append(str(prefix))
    return tuple(binds)


def _usr_layer(layer: Path) -> tuple[Path, str]:
    """A directory laid over /usr: Amazon Linux 2023's python3 (3.9) where this machine has a CPython
    3.9, laid out as in /usr (hard links, no copy), and `aws`. Returns it and what python3 is."""
    (layer / "bin").mkdir(parents=True)
    python39 = find_python39()
    python = "/usr/bin/python3 (this machine's)"
    if python39 is not None:
        prefix = Path(python39).resolve().parent.parent
        shutil.copytree(prefix / "lib" / "python3.9", layer / "lib" / "python3.9", copy_function=os.link)
        libdir = layer / "lib" / "x86_64-linux-gnu"
        libdir.mkdir(parents=True)
        for library in (prefix / "lib").glob("libpython3.9*.so*"):
            os.link(library, libdir / library.name)
        os.link(Path(python39).resolve(), layer / "bin" / "python3.9")
        (layer / "bin" / "python3").symlink_to("python3.9")
        python = f"CPython 3.9 from {prefix}"
    aws = layer / "bin" / "aws"
    aws.write_text(f'#!/bin/sh\nexec {aws_cli().resolve()} "$@"\n')
    aws.chmod(0o755)
    return layer, python


class S3:
    """moto's S3 in the router namespace at S3_IP, holding the bundle where the user data looks."""

    def __init__(self, lab: vpc.Lab, image: Image) -> None:
        self.lab = lab
        lab.router.ip("addr", "add", f"{S3_IP}/32", "dev", "lo")
        log = (lab.dir / "s3.log").open("wb")
        self.proc = lab.router.popen(
            [vpc.PYTHON, "-m", "moto.server", "-H", S3_IP, "-p", str(S3_PORT)],
            cwd=spec.REPO,
            env={"PYTHONPATH": str(spec.REPO), "PATH": os.environ.get("PATH", "")},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        upload = (
            "import boto3, sys, time\n"
            f"s3 = boto3.client('s3', endpoint_url='{S3_URL}', region_name='{vpc.REGION}',"
            " aws_access_key_id='lab', aws_secret_access_key='lab')\n"
            "for _ in range(300):\n"
            "    try:\n"
            "        s3.list_buckets(); break\n"
            "    except Exception:\n"
            "        time.sleep(0.1)\n"
            f"s3.create_bucket(Bucket='{image.bucket}',"
            f" CreateBucketConfiguration={{'LocationConstraint': '{vpc.REGION}'}})\n"
            f"s3.upload_file(sys.argv[1], '{image.bucket}', '{image.key}')\n"
        )
        lab.router.run(vpc.PYTHON, "-c", upload, str(image.asset), timeout=60)

    def close(self) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.lab.router.run("ip", "addr", "del", f"{S3_IP}/32", "dev", "lo", check=False)


@dataclass
class Boot:
    """One boot of a container: when it started (time.monotonic, as the journal's monotonic clock)."""

    started: float
    proc: subprocess.Popen[bytes]
    pid1: int = 0


@dataclass(frozen=True)
class Disk:
    """What a container's disk is made from."""

    user_data: str  # run once at first boot, as root
    usr_layer: Path  # laid over the machine's /usr
    binds: tuple[str, ...]  # host directories bound read-only at the same path
    instance_id: str  # its machine id derives from it
    hostname: str
    cloud_final_env: tuple[str, ...] = (f"AWS_ENDPOINT_URL_S3={S3_URL}",)


class Machine:
    """An instance as a container in namespace `ns`: its disk (`root`) and, while it runs, its systemd."""

    def __init__(self, ns: netns.Netns, disk: Disk, root: Path, log_dir: Path) -> None:
        self.ns = ns
        self.disk = disk
        self.root = root
        self.log_dir = log_dir
        self.name = f"eipr{os.getpid()}-{next(_names)}"
        self.console = log_dir / f"{self.name}-console.log"
        self.boots: list[Boot] = []
        self._make_root()

    # -- the disk --------------------------------------------------------------------------------
    def _make_root(self) -> None:
        root = self.root
        for name in (
            "etc/systemd/system/multi-user.target.wants",
            "var/log/journal",
            "var/lib/cloud/instance/scripts",
            "root",
            "opt",
            "tmp",
            "usr",
        ):
            (root / name).mkdir(parents=True, exist_ok=True)
        # /usr's writable layer (the instance's own /usr/local, its installed files): part of its disk.
        (root.parent / f"{root.name}.usr").mkdir()
        for link, target in (
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ):
            (root / link).symlink_to(target)
        # nspawn looks for it before /usr is mounted: a copy, not the usual link into /usr.
        shutil.copyfile("/usr/lib/os-release", root / "etc/os-release")
        # Debian's alternatives (iptables-restore among them) are links through /etc.
        shutil.copytree("/etc/alternatives", root / "etc/alternatives", symlinks=True)
        # The instance's identity: a machine id of its own (cloud-init's per-instance data keys on it).
        (root / "etc/machine-id").write_text(self.disk.instance_id[2:].ljust(32, "0")[:32] + "\n")
        (root / "etc/hostname").write_text(f"{self.disk.hostname}\n")
        (root / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n"
        )
        (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
        # As on Amazon Linux 2023: dynamic users resolve through nss-systemd.
        (root / "etc/nsswitch.conf").write_text(
            "passwd: files systemd\ngroup: files systemd\nshadow: files\nhosts: files dns\n"
        )
        environment = "".join(f"Environment={e}\n" for e in self.disk.cloud_final_env)
        unit = root / "etc/systemd/system" / CLOUD_FINAL
        unit.write_text(CLOUD_FINAL_UNIT.replace(f"Environment=AWS_ENDPOINT_URL_S3={S3_URL}\n", environment))
        (root / "etc/systemd/system/multi-user.target.wants" / CLOUD_FINAL).symlink_to(f"../{CLOUD_FINAL}")
        runner = root / RUN_USER_DATA.lstrip("/")
        runner.write_text(RUN_USER_DATA_SCRIPT)
        runner.chmod(0o755)
        script = root / USER_DATA.lstrip("/")
        script.write_text(self.disk.user_data)
        script.chmod(0o700)

    # -- power -------------------------------------------------------------------------------------
    def boot(self) -> Boot:
        """Power on; returns once the container's systemd answers (its boot may still be going on)."""
        if self.running:
            raise RuntimeError(f"lab: {self.name} is already running")
        binds = [f"--bind-ro={path}" for path in self.disk.binds]
        argv = [
            "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--private-users=no",
            f"--machine={self.name}", "-D", str(self.root), "--link-journal=no",
            f"--overlay=/usr:{self.disk.usr_layer}:{self.root.parent / f'{self.root.name}.usr'}:/usr", *binds,
            f"--network-namespace-path=/run/netns/{self.ns.name}",
            # As a host whose PID 1 is systemd has it: without it no unit can be given CAP_NET_ADMIN.
            "--capability=CAP_NET_ADMIN",
            "--boot",
        ]  # fmt: skip
        log = self.console.open("ab")
        # The namespace's own network sysctls writable, as a host's are (the NAT's boot writes them).
        env = {**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        log.close()
        boot = Boot(started, proc)
        self.boots.append(boot)
        vpc.wait_for(lambda: self._find_pid1(boot), f"{self.name}'s systemd", timeout=30)
        vpc.wait_for(
            lambda: (
                self.run("systemctl", "is-system-running", check=False).stdout.strip() not in ("", "offline")
            ),
            f"{self.name}'s systemd manager",
            timeout=30,
        )
        return boot

    def _find_pid1(self, boot: Boot) -> bool:
        if boot.proc.poll() is not None:
            console = self.console.read_text(errors="replace")
            tail = " | ".join(console.strip().splitlines()[-3:])
            raise RuntimeError(
                f"lab: systemd-nspawn for {self.name} exited with {boot.proc.returncode}: {tail}"
            )
        for pid in netns.sh("ip", "netns", "pids", self.ns.name, check=False).split():
            with suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()
                if (
                    len(nspid) == 3
                    and nspid[2] == "1"
                    and Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
                ):
                    boot.pid1 = int(pid)
                    return True
        return False

    @property
    def running(self) -> bool:
        return bool(self.boots) and self.boots[-1].proc.poll() is None

    def poweroff(self, timeout: float = 60) -> None:
        """A clean power-off: systemd stops every unit, then the container's processes are gone."""
        if not self.running:
            return
        boot = self.boots[-1]
        self.run("systemctl", "poweroff", "--no-block", check=False)
        try:
            boot.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Say what held the shutdown (a unit's stop job), not only that it took too long.
            jobs = self.run("systemctl", "list-jobs", "--no-pager", check=False).stdout.strip()
            raise RuntimeError(
                f"{self.name}: still running {timeout:.0f} s after poweroff; systemd's jobs: {jobs or 'none'}"
            ) from None

    def kill(self) -> None:
        """Pull the plug (teardown): nspawn and everything in the container die."""
        for boot in self.boots:
            if boot.proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(boot.proc.pid, signal.SIGKILL)
                if boot.pid1:
                    with suppress(ProcessLookupError):
                        os.kill(boot.pid1, signal.SIGKILL)
                boot.proc.wait(10)
        # nspawn leaves its mount propagation directory behind where /run is not a tmpfs (as here).
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)

    # -- inside ------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command in the running container's mount, PID and network namespaces (its systemctl)."""
        pid1 = self.boots[-1].pid1
        done = subprocess.run(
            ["nsenter", "-t", str(pid1), "-m", "-p", "-n", *cmd],
            capture_output=True, text=True, timeout=timeout, check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
        )  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"[{self.name}] {' '.join(cmd)} -> {done.returncode}: {done.stderr.strip()}")
        return done

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """Journal entries (all boots of this disk), as journalctl's JSON."""
        out = self.run(
            "journalctl",
            "--no-pager",
            "-o",
            "json",
            "--output-fields=MESSAGE,_PID,_UID,_GID,_CAP_EFFECTIVE,_SYSTEMD_UNIT,UNIT,JOB_RESULT,_BOOT_ID,SYSLOG_IDENTIFIER,_COMM",
            *args,
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_unit_done(self, unit: str, after: float, timeout: float = 60) -> dict[str, str]:
        """Wait for `unit` to have finished a run that started after `after` (monotonic); its state."""
        props = (
            "ActiveState",
            "SubState",
            "Result",
            "ExecMainStatus",
            "ExecMainStartTimestampMonotonic",
            "ExecMainExitTimestampMonotonic",
            "InactiveEnterTimestampMonotonic",
            "NRestarts",
        )

        def done() -> bool:
            state = self.show(unit, *props)
            started = int(state.get("ExecMainStartTimestampMonotonic") or 0) / 1e6
            exited = int(state.get("ExecMainExitTimestampMonotonic") or 0) / 1e6
            # A oneshot unit with RemainAfterExit= stays active once its process exited.
            return started > after and exited >= started and state["ActiveState"] != "activating"

        vpc.wait_for(done, f"{unit} on {self.name}", timeout=timeout)
        return self.show(unit, *props)


def monotonic(entry: dict[str, Any]) -> float:
    """A journal entry's time on this machine's monotonic clock (a container shares the kernel's)."""
    return int(entry["__MONOTONIC_TIMESTAMP"]) / 1e6


@contextmanager
def booting(lab: vpc.Lab, image: Image) -> Iterator[Any]:
    """A maker of instances that boot in `lab` (an instance and its machine). However the block ends,
    every container is killed and its disk removed (the lab's reset then deletes the namespaces)."""
    machines: list[Machine] = []
    disks = Path(tempfile.mkdtemp(prefix="eip-reclaim-disks-"))

    def make(az_index: int, **kwargs: Any) -> tuple[vpc.Instance, Machine]:
        instance = lab.boot(az_index, **kwargs)
        disk = Disk(
            user_data=image.user_data_for(instance.config()),
            usr_layer=image.usr_layer,
            binds=image.binds,
            instance_id=instance.instance_id,
            hostname=f"ip-{instance.private_ip.replace('.', '-')}",
        )
        machine = Machine(instance.ns, disk, disks / instance.instance_id, lab.dir)
        machines.append(machine)
        return instance, machine

    try:
        yield make
    finally:
        for machine in machines:
            machine.kill()
        shutil.rmtree(disks, ignore_errors=True)


_shared: dict[str, tuple[Path, Image]] = {}


def shared_image() -> tuple[Path, Image]:
    """One synth of the default app (its templates and assets) and the image made from it, for every
    boot test of this process; removed when the process exits."""
    if "image" not in _shared:
        work = Path(tempfile.mkdtemp(prefix="eip-reclaim-boot-"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)
        synth_dir = work / "cdk.out"
        spec.synthesize(synth_dir)
        _shared["image"] = (synth_dir, make_image(synth_dir, work))
    return _shared["image"]
