"""The payload bundle, built by the same path as synth: it runs from its own directory and nothing else."""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

import botocore
import botocore.exceptions
import botocore.model
import botocore.session
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.loaders import Loader
from moto import mock_aws
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from bootstrap.aws import ClientFactory
from bootstrap.claim import Outcome, Retrier, claim
from bootstrap.clock import Deadline
from stacks import bundle
from stacks.bundle import BundleError, BundleInfo, build_bundle
from tests.unit.test_bootstrap_fakes import FakeClock

REPO = Path(__file__).resolve().parents[2]
# The budget for the zipped bundle set when the payload's start was made leaner (docs/payload.md, "Speed").
MAX_ZIPPED_BYTES = 1 << 20


@functools.lru_cache(maxsize=1)
def instance_python() -> str:
    """The interpreter closest to the instance's: a CPython 3.9 when this machine has one, else python3."""
    candidates = [
        *sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.9*/bin/python3.9"))),
        shutil.which("python3.9"),
    ]
    for candidate in candidates:
        if not candidate:
            continue
        # A version manager's shim may exist and still refuse to run: ask the interpreter itself.
        probe = subprocess.run(
            [candidate, "-S", "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    found = shutil.which("python3", path="/usr/bin:/bin")
    assert found, "no python3 in /usr/bin or /bin"
    return found


def run_isolated(unpacked: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the instance-like interpreter with an empty environment, no site-packages, the bundle only."""
    return subprocess.run(
        [instance_python(), "-S", "-s", *args],
        env={
            "PYTHONPATH": str(unpacked),
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONDONTWRITEBYTECODE": "1",
        },
        cwd=unpacked,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.fixture(scope="module")
def built() -> BundleInfo:
    # The default cache under build/, shared with synth: the suite builds it at most once.
    info = build_bundle()
    print(
        f"\nbundle: {info.path.name} {info.size} bytes zipped ({info.size / 1_000_000:.2f} MB), "
        f"{info.file_count} files, sha256 {info.sha256}; interpreter {instance_python()}"
    )
    return info


@pytest.fixture(scope="module")
def names(built: BundleInfo) -> list[str]:
    with zipfile.ZipFile(built.path) as archive:
        return archive.namelist()


@pytest.fixture(scope="module")
def unpacked(built: BundleInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Extracted the way the user data does it: the standard library's zipfile, no unzip binary.
    dest = tmp_path_factory.mktemp("bundle") / "opt-eip-reclaim"
    with zipfile.ZipFile(built.path) as archive:
        archive.extractall(dest)
    return dest


def test_payload_runs_from_the_bundle_alone(unpacked: Path) -> None:
    # The instance runs exactly this: python3 -m bootstrap with the bundle as its only library.
    result = run_isolated(unpacked, "-m", "bootstrap", "--help")
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    assert "--dry-run" in result.stdout


def test_dependencies_load_from_the_bundle_not_the_host(unpacked: Path) -> None:
    code = (
        "import sys, botocore, urllib3, dateutil, jmespath\n"
        "from bootstrap.iproute import iproute_class\n"
        "iproute_class()\n"
        "import pyroute2\n"
        "for m in (botocore, pyroute2, urllib3, dateutil, jmespath): print(m.__file__)\n"
        "print('urllib3', urllib3.__version__)\n"
    )
    result = run_isolated(unpacked, "-c", code)
    assert result.returncode == 0, result.stderr
    *paths, version_line = result.stdout.splitlines()
    assert all(Path(p).is_relative_to(unpacked) for p in paths), paths
    # botocore requires urllib3 < 1.27 on Python 3.9: the 2.x line must not be shipped.
    assert version_line == "urllib3 1.26.20"


def test_clients_are_created_from_the_trimmed_models(unpacked: Path) -> None:
    # aws-facts: facts-ec2-dualstack-endpoint
    # Client creation reads endpoints, partitions, SDK defaults, the retry config and the service model:
    # this fails if the trim removed anything it needs. Static keys: no credential lookup, no network.
    # The dual-stack endpoint too (egress direct in an IPv6 network), which the endpoint rules resolve.
    code = "\n".join(
        [
            "import botocore.session",
            "from botocore.config import Config",
            "s = botocore.session.Session()",
            "print(sorted(s.get_available_services()))",
            f"for service, ops in {dict(bundle.KEPT_OPERATIONS)!r}.items():",
            "    for dualstack in (None, True):",
            "        client = s.create_client(service, region_name='ap-southeast-2',",
            "            aws_access_key_id='AKID',",
            "            aws_secret_access_key='secret', config=Config(use_dualstack_endpoint=dualstack))",
            "        print(service, client.meta.endpoint_url)",
            "    for op in ops: client.meta.service_model.operation_model(op)",
        ]
    )
    result = run_isolated(unpacked, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "['autoscaling', 'cloudformation', 'cloudwatch', 'ec2']",
        "ec2 https://ec2.ap-southeast-2.amazonaws.com",
        "ec2 https://ec2.ap-southeast-2.api.aws",
        "autoscaling https://autoscaling.ap-southeast-2.amazonaws.com",
        "autoscaling https://autoscaling.ap-southeast-2.api.aws",
        "cloudformation https://cloudformation.ap-southeast-2.amazonaws.com",
        "cloudformation https://cloudformation.ap-southeast-2.api.aws",
        "cloudwatch https://monitoring.ap-southeast-2.amazonaws.com",
        "cloudwatch https://monitoring.ap-southeast-2.api.aws",
    ]


def test_every_module_compiles_on_the_instance_python(unpacked: Path, tmp_path: Path) -> None:
    # The user data byte-compiles the bundle with the instance's python3 and stops on any failure.
    copy = tmp_path / "copy"
    shutil.copytree(unpacked, copy)
    result = subprocess.run(
        [instance_python(), "-S", "-m", "compileall", "-q", "-j", "0", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_tests_caches_binaries_or_install_noise(names: list[str]) -> None:
    # None of these run on the instance, and compiled extensions for this host could not.
    for name in names:
        parts = name.split("/")
        assert not name.startswith("/") and ".." not in parts, name
        assert "__pycache__" not in parts and not name.endswith((".pyc", ".pyo")), name
        assert not name.endswith((".so", ".pyd", ".dylib", ".dll")), name
        assert not set(parts[1:-1]) & {"tests", "test", "testing"}, name
        assert parts[0] != "bin", name
        assert not (parts[0].endswith(".dist-info") and parts[-1] in {"RECORD", "INSTALLER", "REQUESTED"}), (
            name
        )


def test_licenses_stay_with_their_packages(names: list[str]) -> None:
    # Redistributing the dependencies means shipping their licence texts.
    for dist in ("botocore", "urllib3", "pyroute2"):
        assert any(n.startswith(f"{dist}-") and "LICENSE" in n.upper() for n in names), dist


def test_botocore_keeps_only_the_payloads_services(names: list[str]) -> None:
    services = {n.split("/")[2] for n in names if n.startswith("botocore/data/") and n.count("/") > 2}
    assert services == set(bundle.KEPT_SERVICES)
    # Only the newest API version of each (the one botocore loads by default), and of it only the model
    # and the endpoint rules: no paginators, waiters or examples.
    versions = {
        tuple(n.split("/")[2:4]) for n in names if n.startswith("botocore/data/") and n.count("/") > 3
    }
    assert len(versions) == len(services)
    files = {n.split("/")[-1] for n in names if n.startswith("botocore/data/") and n.count("/") > 3}
    assert files == {"service-2.json", "endpoint-rule-set-1.json.gz"}
    shared = {n.split("/")[2] for n in names if n.startswith("botocore/data/") and n.count("/") == 2}
    assert shared == {"endpoints.json", "partitions.json", "sdk-default-configuration.json", "_retry.json"}
    # boto3 is not shipped: the payload uses botocore's Session itself.
    assert not [n for n in names if n.startswith(("boto3", "s3transfer"))]


def test_payload_and_units_are_copied_verbatim(built: BundleInfo, names: list[str]) -> None:
    # Whatever the payload package holds at build time goes in, byte for byte; the units too.
    with zipfile.ZipFile(built.path) as archive:
        for source in sorted((REPO / "bootstrap").rglob("*.py")):
            if "__pycache__" in source.parts:
                continue
            name = "bootstrap/" + source.relative_to(REPO / "bootstrap").as_posix()
            assert archive.read(name) == source.read_bytes(), name
        for unit in sorted((REPO / "deploy/systemd").iterdir()):
            assert archive.read(f"{bundle.UNITS_ARCDIR}/{unit.name}") == unit.read_bytes(), unit.name
    assert "bootstrap/requirements.txt" not in names


def test_entries_are_normalised(built: BundleInfo, names: list[str]) -> None:
    # Sorted names, one timestamp and one mode: nothing of the build machine or the clock leaks in.
    assert names == sorted(names)
    with zipfile.ZipFile(built.path) as archive:
        for info in archive.infolist():
            assert info.date_time == bundle.ZIP_EPOCH, info.filename
            assert info.external_attr >> 16 == 0o100644, info.filename
            assert info.create_system == 3, info.filename


def test_pins_are_complete_and_consistent_for_the_target_python(unpacked: Path) -> None:
    # pip installs with --no-deps, so the pins must close over every dependency, judged with the
    # markers of Python 3.9 (not the host's): this fails if a pin is missing or the wrong line is pinned.
    target = {"python_version": bundle.DEFAULT_PYTHON_VERSION, "python_full_version": "3.9.16", "extra": ""}
    shipped: dict[str, Version] = {}
    requirements: list[Requirement] = []
    for meta in sorted(unpacked.glob("*.dist-info/METADATA")):
        headers = HeaderParser().parsestr(meta.read_text())
        name = headers["Name"].lower().replace("_", "-")
        shipped[name] = Version(headers["Version"])
        requires_python = headers.get("Requires-Python", "")
        assert Version("3.9.16") in SpecifierSet(requires_python), f"{name} requires Python {requires_python}"
        requirements += [Requirement(value) for value in headers.get_all("Requires-Dist", [])]
    for requirement in requirements:
        if requirement.marker is not None and not Marker(str(requirement.marker)).evaluate(target):
            continue
        name = requirement.name.lower().replace("_", "-")
        assert name in shipped, f"{requirement} is needed on Python 3.9 and not bundled"
        assert shipped[name] in requirement.specifier, (
            f"{name} {shipped[name]} does not satisfy {requirement}"
        )


def test_manifest_names_the_bundled_versions(unpacked: Path, built: BundleInfo) -> None:
    manifest = json.loads((unpacked / bundle.MANIFEST_NAME).read_text())
    assert manifest["input_hash"] == built.input_hash
    assert manifest["python_version"] == "3.9"  # Amazon Linux 2023's python3
    assert manifest["packages"]["botocore"] == "1.42.97"
    assert manifest["operations"] == {k: list(v) for k, v in bundle.KEPT_OPERATIONS.items()}


def test_size_within_budget(built: BundleInfo) -> None:
    # The budget: the untrimmed dependencies are about 20 MB zipped, 2.4 MB with whole models.
    assert built.size <= MAX_ZIPPED_BYTES, f"{built.size} bytes > {MAX_ZIPPED_BYTES}"
    assert built.sha256 == hashlib.sha256(built.path.read_bytes()).hexdigest()


def test_rebuild_gives_the_same_bytes(built: BundleInfo, tmp_path: Path) -> None:
    # Same inputs, fresh cache: same bytes, so the same asset hash and no instance replacement.
    log = io.StringIO()
    again = build_bundle(out_dir=tmp_path, log=log)
    print(log.getvalue(), end="")
    assert "cold cache" in log.getvalue()
    assert again.path.read_bytes() == built.path.read_bytes()
    assert (again.sha256, again.input_hash) == (built.sha256, built.input_hash)


def test_a_cached_bundle_is_returned_without_building(built: BundleInfo) -> None:
    log = io.StringIO()
    assert build_bundle(log=log) == built
    assert log.getvalue() == ""


def test_the_payload_directory_is_taken_as_it_is(built: BundleInfo, tmp_path: Path) -> None:
    # A module added to the payload changes the inputs and lands in the bundle.
    payload = tmp_path / "bootstrap"
    shutil.copytree(REPO / "bootstrap", payload, ignore=shutil.ignore_patterns("__pycache__"))
    (payload / "extra_module.py").write_text("VALUE = 1\n")
    out = tmp_path / "out"
    out.mkdir()
    # Stale bundles of earlier inputs: a cold build keeps only the newest few.
    for age in range(6):
        stale = out / f"bundle-stale{age}.zip"
        stale.write_bytes(b"")
        os.utime(stale, (1_000_000 + age, 1_000_000 + age))
    info = build_bundle(out_dir=out, payload_dir=payload, log=io.StringIO())
    assert info.input_hash != built.input_hash
    with zipfile.ZipFile(info.path) as archive:
        assert archive.read("bootstrap/extra_module.py") == b"VALUE = 1\n"
    kept = sorted(p.name for p in out.glob("bundle-*.zip"))
    assert len(kept) == bundle.CACHE_KEEP
    assert info.path.name in kept
    assert "bundle-stale5.zip" in kept and "bundle-stale0.zip" not in kept


def test_target_python_is_honoured(tmp_path: Path) -> None:
    # botocore 1.42 needs Python 3.9: asking for 3.8 must fail with pip's reason, not ship a broken bundle.
    with pytest.raises(BundleError, match=r"Python 3\.8") as raised:
        build_bundle(out_dir=tmp_path, python_version="3.8", log=io.StringIO())
    assert "botocore==1.42.97" in str(raised.value)
    assert len(str(raised.value).splitlines()) < 10
    assert not list(tmp_path.glob("*.zip"))


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="payload package not found"):
        build_bundle(out_dir=tmp_path, payload_dir=tmp_path / "nowhere", log=io.StringIO())
    with pytest.raises(BundleError, match="no systemd units"):
        build_bundle(out_dir=tmp_path, units_dir=tmp_path, log=io.StringIO())


def test_command_line_prints_the_bundle() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stacks.bundle"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    data = Path(printed["path"]).read_bytes()
    assert printed["sha256"] == hashlib.sha256(data).hexdigest()
    assert int(printed["size"]) == len(data)


# --- The trimmed service models -------------------------------------------------------------------------

# A method call on a client in the payload's source: `.describe_addresses(`, `client.put_metric_data(`.
CALL = re.compile(r"\.([a-z][a-z0-9_]*)\(")
# How the payload names the service of each client it makes (bootstrap/aws.py).
CLIENT_SERVICE = re.compile(r"""(?:_client|create_client)\(\s*"([a-z0-9-]+)\"""")


def _payload_sources() -> dict[str, str]:
    return {
        path.relative_to(REPO).as_posix(): path.read_text()
        for path in sorted((REPO / "bootstrap").rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def _full_model(service: str) -> dict[str, Any]:
    """The whole model of a kept service, from this checkout's botocore (newer than the pin, a superset)."""
    loaded: dict[str, Any] = (
        botocore.session.get_session().get_component("data_loader").load_service_model(service, "service-2")
    )
    return loaded


def _trimmed_model(unpacked: Path, service: str) -> dict[str, Any]:
    (model,) = (unpacked / "botocore" / "data" / service).glob("*/service-2.json")
    loaded: dict[str, Any] = json.loads(model.read_text())
    return loaded


def test_every_api_call_in_the_payload_is_kept() -> None:
    # Grepped from bootstrap/, so a new call cannot ship without its model: every method called on
    # anything that is an operation of a service the payload makes clients for must be kept.
    sources = _payload_sources()
    services = {name for text in sources.values() for name in CLIENT_SERVICE.findall(text)}
    assert services == set(bundle.KEPT_OPERATIONS), services
    called = {name for text in sources.values() for name in CALL.findall(text)}
    found: dict[str, set[str]] = {}
    for service in services:
        by_method = {botocore.xform_name(op): op for op in _full_model(service)["operations"]}
        found[service] = {by_method[name] for name in called & set(by_method)}
        assert found[service] <= set(bundle.KEPT_OPERATIONS[service]), (service, found[service])
    # The grep itself works: the six calls the payload and its watchdog make today are all seen.
    assert found == {
        "ec2": {"DescribeAddresses", "DescribeInstances", "AssociateAddress"},
        "autoscaling": {"CompleteLifecycleAction", "SetInstanceHealth"},
        "cloudformation": {"SignalResource"},
        "cloudwatch": {"PutMetricData"},
    }
    # Paginators and waiters are not shipped.
    assert not called & {"get_paginator", "get_waiter", "can_paginate"}


def test_trimmed_models_hold_every_shape_their_operations_reach(unpacked: Path) -> None:
    for service, operations in bundle.KEPT_OPERATIONS.items():
        model = _trimmed_model(unpacked, service)
        assert list(model["operations"]) == sorted(operations, key=list(model["operations"]).index)
        assert set(model["operations"]) == set(operations), service
        # Every shape named anywhere is present, and every shape present is reached (nothing extra).
        shapes = model["shapes"]
        todo = [
            ref["shape"]
            for op in model["operations"].values()
            for ref in [op.get("input"), op.get("output"), *op.get("errors", [])]
            if ref
        ]
        reached = set()
        while todo:
            name = todo.pop()
            assert name in shapes, f"{service}: {name} is referenced but not kept"
            if name not in reached:
                reached.add(name)
                todo += bundle._shape_refs(shapes[name])
        assert reached == set(shapes), service
        # botocore resolves every shape of every kept operation, all the way down.
        service_model = botocore.model.ServiceModel(model, service_name=service)
        for op in operations:
            operation = service_model.operation_model(op)
            for shape in (operation.input_shape, operation.output_shape):
                _walk(shape, set())


def _walk(shape: Any, seen: set[str]) -> None:
    if shape is None or shape.name in seen:
        return
    seen.add(shape.name)
    for child in getattr(shape, "members", {}).values():
        _walk(child, seen)
    for attribute in ("member", "key", "value"):
        _walk(getattr(shape, attribute, None), seen)


def test_trimming_keeps_each_shape_as_it_was_but_its_documentation() -> None:
    # On this checkout's whole models: the kept shapes are the originals, minus documentation only.
    for service, operations in bundle.KEPT_OPERATIONS.items():
        full = _full_model(service)
        trimmed = bundle.trim_model(full, operations)
        assert trimmed["metadata"] == full["metadata"]
        for name, shape in trimmed["shapes"].items():
            assert json.dumps(shape) == json.dumps(_strip_docs(full["shapes"][name])), name
    with pytest.raises(BundleError, match="no operation NoSuchCall"):
        bundle.trim_model(_full_model("ec2"), ("DescribeAddresses", "NoSuchCall"))


def test_a_model_with_extras_to_merge_is_refused(tmp_path: Path) -> None:
    # botocore merges service-2.sdk-extras.json into the model: a trim that ignored it would change it.
    version = tmp_path / "data" / "ec2" / "2016-11-15"
    version.mkdir(parents=True)
    (version / "service-2.json").write_text(json.dumps(_full_model("ec2")))
    (version / "service-2.sdk-extras.json").write_text("{}")
    with pytest.raises(BundleError, match="sdk-extras"):
        bundle._keep_operations(tmp_path / "data", {"ec2": ("DescribeAddresses",)})


def _strip_docs(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _strip_docs(v) for k, v in node.items() if not (k == "documentation" and isinstance(v, str))
        }
    return node


def _trimmed_session(unpacked: Path) -> botocore.session.Session:
    """A botocore session that can see only the bundle's data directory."""
    session = botocore.session.Session()
    loader = Loader(
        extra_search_paths=[str(unpacked / "botocore" / "data")], include_default_search_paths=False
    )
    session.register_component("data_loader", loader)
    return session


class _TrimmedFactory(ClientFactory):
    """The payload's own client factory (timeouts, retries, dual-stack), on the bundle's data only."""

    def __init__(self, region: str, unpacked: Path) -> None:
        super().__init__(region)
        self._unpacked = unpacked

    def _load(self) -> None:
        self._session = _trimmed_session(self._unpacked)


@pytest.fixture
def moto_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        yield


def test_the_payloads_calls_round_trip_against_moto_with_the_trimmed_models(
    unpacked: Path, moto_env: None
) -> None:
    region = "us-east-1"
    factory = _TrimmedFactory(region, unpacked).start()
    assert sorted(factory.session().get_available_services()) == sorted(bundle.KEPT_OPERATIONS)
    full = botocore.session.get_session()
    setup_ec2 = full.create_client("ec2", region_name=region)
    image = setup_ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    reply = setup_ec2.run_instances(ImageId=image, MinCount=2, MaxCount=2, InstanceType="t3.micro")
    me, other = (i["InstanceId"] for i in reply["Instances"])
    allocation = setup_ec2.allocate_address(Domain="vpc", Address="198.51.100.7")["AllocationId"]
    setup_ec2.associate_address(AllocationId=allocation, InstanceId=other)

    # EC2: the payload's own claim (describe, the holder's instance, associate, verify).
    ec2 = factory.ec2(None, None)
    calls: list[str] = []
    ec2.meta.events.register("before-call.ec2.*", lambda model, **_: calls.append(model.name))
    retrier = Retrier(Deadline(FakeClock(), 240), rng=random.Random(3))
    assert claim(ec2, me, allocation, retrier) is Outcome.ASSOCIATED
    assert calls == ["DescribeAddresses", "DescribeInstances", "AssociateAddress", "DescribeAddresses"]
    assert setup_ec2.describe_addresses(AllocationIds=[allocation])["Addresses"][0]["InstanceId"] == me
    assert factory.ec2(None, None, dualstack=True).meta.endpoint_url == "https://ec2.us-east-1.api.aws"

    # CloudWatch: what the payload publishes lands.
    factory.cloudwatch(None, None).put_metric_data(
        Namespace="EipReclaim",
        MetricData=[
            {
                "MetricName": "HealSeconds",
                "Dimensions": [{"Name": "Service", "Value": "web"}],
                "Value": 0.3,
                "Unit": "Seconds",
            }
        ],
    )
    metrics = full.create_client("cloudwatch", region_name=region).list_metrics(Namespace="EipReclaim")
    assert [m["MetricName"] for m in metrics["Metrics"]] == ["HealSeconds"]

    # Auto Scaling: the watchdog's SetInstanceHealth on a member of a group.
    autoscaling = full.create_client("autoscaling", region_name=region)
    autoscaling.create_launch_configuration(
        LaunchConfigurationName="lc", ImageId=image, InstanceType="t3.micro"
    )
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="svc",
        LaunchConfigurationName="lc",
        MinSize=1,
        MaxSize=1,
        AvailabilityZones=[f"{region}a"],
    )
    (member,) = autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"][0]["Instances"]
    factory.autoscaling(None, None).set_instance_health(
        InstanceId=member["InstanceId"], HealthStatus="Unhealthy", ShouldRespectGracePeriod=True
    )
    health = autoscaling.describe_auto_scaling_instances(InstanceIds=[member["InstanceId"]])
    assert health["AutoScalingInstances"][0]["HealthStatus"].lower() == "unhealthy"


# moto has neither CompleteLifecycleAction nor SignalResource: their requests are compared with what the
# whole model serializes, and the documented empty answer is parsed.
UNMOCKED_CALLS = {
    ("autoscaling", "complete_lifecycle_action"): {
        "LifecycleHookName": "svc-launch",
        "AutoScalingGroupName": "svc-asg",
        "LifecycleActionResult": "CONTINUE",
        "InstanceId": "i-0123456789abcdef0",
    },
    ("cloudformation", "signal_resource"): {
        "StackName": "svc",
        "LogicalResourceId": "Group",
        "UniqueId": "i-0123456789abcdef0",
        "Status": "SUCCESS",
    },
}


def test_calls_moto_lacks_serialize_as_the_whole_model_does(unpacked: Path) -> None:
    def sent(session: botocore.session.Session, service: str, method: str, params: dict[str, str]) -> str:
        client = session.create_client(
            service, region_name="us-east-1", aws_access_key_id="AKID", aws_secret_access_key="secret"
        )
        bodies: list[str] = []

        def answer(request: Any, **_: Any) -> AWSResponse:
            bodies.append(request.body)
            action = client.meta.method_to_api_mapping[method]
            # The documented answer of both: an empty result and the request id.
            xml = (
                f"<{action}Response><{action}Result/>"
                f"<ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></{action}Response>"
            )
            return AWSResponse(request.url, 200, {}, _Raw(xml.encode()))

        client.meta.events.register("before-send", answer)
        answered = getattr(client, method)(**params)
        assert answered["ResponseMetadata"]["RequestId"] == "r"
        return bodies[0]

    for (service, method), params in UNMOCKED_CALLS.items():
        trimmed = sent(_trimmed_session(unpacked), service, method, params)
        whole = sent(botocore.session.get_session(), service, method, params)
        assert trimmed == whole, (service, method)
        assert f"Action={botocore.xform_name(method).title().replace('_', '')}" in trimmed


class _Raw:
    """The raw stream botocore reads a canned response from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


def test_trimmed_endpoints_resolve_every_region_as_the_whole_file_does(unpacked: Path) -> None:
    # endpoints.json keeps only the kept services' entries: every region of every partition, with and
    # without dual-stack, gives the same endpoint as botocore's whole file.
    trimmed, whole = _trimmed_session(unpacked), botocore.session.get_session()
    partitions = json.loads((unpacked / "botocore/data/endpoints.json").read_text())["partitions"]
    regions = [region for partition in partitions for region in partition["regions"]]
    assert len(regions) > 30
    for service in bundle.KEPT_OPERATIONS:
        for region in regions:
            for dualstack in (None, True):
                config = Config(use_dualstack_endpoint=dualstack)
                urls = [_endpoint(s, service, region, config) for s in (trimmed, whole)]
                assert urls[0] == urls[1], (service, region, dualstack)


def _endpoint(session: botocore.session.Session, service: str, region: str, config: Config) -> str:
    """The client's endpoint, or the error that says there is none (no dual-stack name in some regions)."""
    try:
        client = session.create_client(
            service, region_name=region, aws_access_key_id="a", aws_secret_access_key="b", config=config
        )
    except botocore.exceptions.BotoCoreError as err:
        return type(err).__name__
    return str(client.meta.endpoint_url)


# --- pyroute2 past its package __init__ --------------------------------------------------------------------


def test_iproute_loads_past_the_pruned_parts_of_pyroute2(unpacked: Path) -> None:
    # The payload's own import (bootstrap/iproute.py) in the bundle: IPRoute dumps links (whose kinds load
    # plugins on demand), addresses, routes and rules, and resolves a route, as the payload does; the
    # package's NullHandler is in place; nothing pruned was imported.
    code = "\n".join(
        [
            "import logging, sys",
            "from bootstrap.iproute import iproute_class",
            "with iproute_class()() as ipr:",
            "    print(len(ipr.get_links()) > 0, len(ipr.get_addr()) > 0, len(ipr.get_routes()) >= 0,",
            "          len(ipr.get_rules()) > 0, len(ipr.route('get', dst='127.0.0.1')) == 1)",
            "from pyroute2.netlink.exceptions import NetlinkError",
            "print([type(h).__name__ for h in logging.getLogger('pyroute2').handlers])",
            f"pruned = {sorted(_pruned_modules())!r}",
            "print(sorted(m for m in sys.modules if any(m == p or m.startswith(p + '.') for p in pruned)))",
        ]
    )
    result = run_isolated(unpacked, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True True True True True", "['NullHandler']", "[]"]
    assert result.stderr == ""


def _pruned_modules() -> set[str]:
    """The importable names of what the bundle prunes (packages and modules, not data files)."""
    return {
        p.removesuffix(".py").replace("/", ".")
        for p in bundle.PRUNED_PATHS
        if p.endswith(".py") or "." not in p.rsplit("/", 1)[-1]
    }


def test_no_shipped_module_imports_a_pruned_one_but_pyroute2s_init(unpacked: Path) -> None:
    # Static: an import statement (at any depth: lazy ones too) naming a pruned module. Only pyroute2's
    # own __init__, which the payload never runs, and the guarded imports below may.
    pruned = _pruned_modules()
    offenders = []
    for path in sorted(unpacked.rglob("*.py")):
        relative = path.relative_to(unpacked)
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for line in path.read_text(errors="replace").splitlines():
            match = re.match(r"\s*(?:from\s+(\S+)\s+import|import\s+([\w.]+))", line)
            if not match:
                continue
            target = match.group(1) or match.group(2)
            if target.startswith("."):
                dots = len(target) - len(target.lstrip("."))
                base = package.split(".")[: len(package.split(".")) - dots + 1]
                target = ".".join([*base, target.lstrip(".")]).rstrip(".")
            if any(target == p or target.startswith(p + ".") for p in pruned):
                offenders.append(f"{relative}: {line.strip()}")
    # botocore tries urllib3's pyopenssl under `except ImportError` and falls back to the ssl module;
    # pyroute2 loads its BSD IPRoute only where sys.platform names a BSD.
    guarded = {
        "botocore/httpsession.py: from urllib3.contrib.pyopenssl import (",
        "pyroute2/iproute/__init__.py: "
        "from pyroute2.iproute.bsd import ChaoticIPRoute, IPRoute, NetNS, RawIPRoute",
    }
    unguarded = [o for o in offenders if o not in guarded and not o.startswith("pyroute2/__init__.py:")]
    assert not unguarded
    assert guarded <= set(offenders)  # the scan itself sees them
