"""The payload bundle, built by the same path as synth: it runs from its own directory and nothing else."""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from stacks import bundle
from stacks.bundle import BundleError, BundleInfo, build_bundle

REPO = Path(__file__).resolve().parents[2]
# The budget for the zipped bundle.
MAX_ZIPPED_BYTES = 2_500_000
# The calls the payload makes; trimming botocore's data must keep their models.
PAYLOAD_OPERATIONS = {
    "ec2": ("DescribeAddresses", "AssociateAddress", "DescribeInstances"),
    "autoscaling": ("CompleteLifecycleAction",),
    "cloudformation": ("SignalResource",),
    "cloudwatch": ("PutMetricData",),
}


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
        "import sys, boto3, botocore, pyroute2, urllib3, dateutil, jmespath\n"
        "for m in (boto3, botocore, pyroute2, urllib3, dateutil, jmespath): print(m.__file__)\n"
        "print('urllib3', urllib3.__version__)\n"
    )
    result = run_isolated(unpacked, "-c", code)
    assert result.returncode == 0, result.stderr
    *paths, version_line = result.stdout.splitlines()
    assert all(Path(p).is_relative_to(unpacked) for p in paths), paths
    # botocore requires urllib3 < 1.27 on Python 3.9: the 2.x line must not be shipped.
    assert version_line == "urllib3 1.26.20"


def test_clients_are_created_from_the_trimmed_models(unpacked: Path) -> None:
    # Client creation reads endpoints, partitions, SDK defaults, the retry config and the service model:
    # this fails if the trim removed anything it needs. Static keys: no credential lookup, no network.
    code = "\n".join(
        [
            "import boto3",
            "s = boto3.session.Session(region_name='ap-southeast-2', aws_access_key_id='AKIDEXAMPLE',",
            "                          aws_secret_access_key='secret')",
            "print(sorted(s.get_available_services()))",
            f"for service, ops in {PAYLOAD_OPERATIONS!r}.items():",
            "    client = s.client(service)",
            "    print(service, client.meta.endpoint_url)",
            "    for op in ops: client.meta.service_model.operation_model(op)",
        ]
    )
    result = run_isolated(unpacked, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "['autoscaling', 'cloudformation', 'cloudwatch', 'ec2']",
        "ec2 https://ec2.ap-southeast-2.amazonaws.com",
        "autoscaling https://autoscaling.ap-southeast-2.amazonaws.com",
        "cloudformation https://cloudformation.ap-southeast-2.amazonaws.com",
        "cloudwatch https://monitoring.ap-southeast-2.amazonaws.com",
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
    for dist in ("boto3", "botocore", "urllib3", "pyroute2"):
        assert any(n.startswith(f"{dist}-") and "LICENSE" in n.upper() for n in names), dist


def test_botocore_keeps_only_the_payloads_services(names: list[str]) -> None:
    services = {n.split("/")[2] for n in names if n.startswith("botocore/data/") and n.count("/") > 2}
    assert services == set(bundle.KEPT_SERVICES)
    # Only the newest API version of each: the one botocore loads by default.
    versions = {
        tuple(n.split("/")[2:4]) for n in names if n.startswith("botocore/data/") and n.count("/") > 3
    }
    assert len(versions) == len(services)
    shared = {n.split("/")[2] for n in names if n.startswith("botocore/data/") and n.count("/") == 2}
    assert {"endpoints.json", "partitions.json", "sdk-default-configuration.json", "_retry.json"} <= shared
    boto3_models = {n.split("/")[2] for n in names if n.startswith("boto3/data/")}
    assert boto3_models <= set(bundle.KEPT_SERVICES)


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
    assert manifest["python_version"] == bundle.DEFAULT_PYTHON_VERSION
    assert manifest["packages"]["boto3"] == "1.42.97"


def test_size_within_budget(built: BundleInfo) -> None:
    # The budget: the untrimmed dependencies are about 20 MB zipped.
    assert built.size <= MAX_ZIPPED_BYTES
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
    # boto3 1.42 needs Python 3.9: asking for 3.8 must fail with pip's reason, not ship a broken bundle.
    with pytest.raises(BundleError, match=r"Python 3\.8") as raised:
        build_bundle(out_dir=tmp_path, python_version="3.8", log=io.StringIO())
    assert "boto3==1.42.97" in str(raised.value)
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
