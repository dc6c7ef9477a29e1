"""The payload bundle: the payload, its pinned dependencies and its systemd units, in a reproducible zip."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import Any, TextIO

_PACKAGE_DIR = Path(__file__).resolve().parent
# An installed wheel carries the payload, its pins and its units as package data here (pyproject.toml);
# a checkout has them at the top of the repository.
SHIPPED_DIR = _PACKAGE_DIR / "_payload"
INSTALLED = SHIPPED_DIR.is_dir()
REPO_ROOT = _PACKAGE_DIR.parent
DEFAULT_PAYLOAD_DIR = SHIPPED_DIR / "bootstrap" if INSTALLED else REPO_ROOT / "bootstrap"
DEFAULT_UNITS_DIR = SHIPPED_DIR / "systemd" if INSTALLED else REPO_ROOT / "deploy" / "systemd"
# build/ is git-ignored: the cache survives between synths and test runs, never lands in a commit.
DEFAULT_OUT_DIR = REPO_ROOT / "build"
# Installed, site-packages may be read-only and is shared: the cache goes under the CDK app's working
# directory instead (the CLI runs the app in the project's directory, beside cdk.out).
INSTALLED_OUT_DIR = Path("build", "eip-reclaim")

# Amazon Linux 2023's system python3.
DEFAULT_PYTHON_VERSION = "3.9"
# The only AWS operations the payload calls, by botocore's model directory (CloudWatch's endpoint prefix is
# "monitoring"); every other botocore model is dead weight (about 20 MB zipped). Each kept model is cut
# down to these operations and the shapes they reach: the whole EC2 model is 0.5 MB zipped and its
# parse took a tenth of a second of every start. SetInstanceHealth is the watchdog's (bootstrap/watchdog.py).
# tests/unit/test_bundle.py finds every API call in bootstrap/ and fails if one is missing here.
KEPT_OPERATIONS: Mapping[str, tuple[str, ...]] = {
    "ec2": ("AssociateAddress", "DescribeAddresses", "DescribeInstances"),
    "autoscaling": ("CompleteLifecycleAction", "SetInstanceHealth"),
    "cloudformation": ("SignalResource",),
    "cloudwatch": ("PutMetricData",),
}
KEPT_SERVICES: tuple[str, ...] = tuple(KEPT_OPERATIONS)
# What a client needs of a service's API version: its model and its endpoint rules. Paginators and
# waiters are read only by get_paginator()/get_waiter()/can_paginate() (botocore takes a missing file
# as "none"), examples only by documentation tools.
KEPT_MODEL_FILES = ("service-2", "endpoint-rule-set-1")
# Where the units sit inside the bundle: a name that is not a Python identifier, so the directory can
# never shadow an importable package on PYTHONPATH.
UNITS_ARCDIR = "systemd-units"
MANIFEST_NAME = "bundle-manifest.json"
# The earliest timestamp a zip entry can carry: fixed, so the bytes do not depend on when files were written.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Cold builds delete older bundles beyond this many (each payload edit makes one of 2 MB); a few stay for
# concurrent synths of other inputs that may still be reading theirs.
CACHE_KEEP = 4
# Bumped when this module changes what it writes; the module's own source is hashed into the cache key too.
BUILD_FORMAT = 1
# Parts of the pinned packages that nothing on the payload's path imports or reads (0.4 MB zipped); each
# must exist, so a new pin that moves one fails the build instead of shipping it.
PRUNED_PATHS = (
    # dateutil's copy of the tz database: only tz.gettz() on a host without /usr/share/zoneinfo reads it;
    # botocore uses tzutc() and tzlocal().
    "dateutil/zoneinfo/dateutil-zoneinfo.tar.gz",
    # urllib3's alternatives to the ssl module and its proxies: botocore uses the ssl module (it tries
    # pyopenssl first and falls back on the ImportError).
    "urllib3/contrib/_securetransport",
    "urllib3/contrib/appengine.py",
    "urllib3/contrib/ntlmpool.py",
    "urllib3/contrib/pyopenssl.py",
    "urllib3/contrib/securetransport.py",
    "urllib3/contrib/socks.py",
    # pyroute2 beyond IPRoute and rtnetlink: bootstrap/iproute.py imports IPRoute past the package's
    # __init__ (which imports all of these), so `import pyroute2` itself fails in the bundle.
    *(
        f"pyroute2/{name}"
        for name in (
            "bsd",
            "conntrack.py",
            "decoder",
            "devlink.py",
            "dhcp",
            "ethtool",
            "ext",
            "fixtures",
            "ipdb",
            "iproute/bsd.py",
            "ipset.py",
            "ipvs.py",
            "iwutil.py",
            "minimal.py",
            "ndb",
            "nftables",
            "nslink",
            "plan9",
            "wirouting",
            "wiset.py",
            "netlink/devlink",
            "netlink/diag",
            "netlink/event",
            "netlink/generic",
            "netlink/nfnetlink",
            "netlink/nl80211",
            "netlink/taskstats",
        )
    ),
)
# Directory names that only hold a package's own test suite.
TEST_DIRS = frozenset({"tests", "test", "testing"})
BINARY_SUFFIXES = (".so", ".pyd", ".dylib", ".dll")
# Files of a *.dist-info that describe the installation on this machine rather than the package:
# RECORD lists files the trim removed, INSTALLER/REQUESTED/direct_url.json name this build's pip.
DIST_INFO_NOISE = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "entry_points.txt"})


class BundleError(RuntimeError):
    """The bundle cannot be built from these inputs."""


@dataclass(frozen=True)
class BundleInfo:
    """A built bundle. ``sha256`` is the hash of the zip's bytes, which user data verifies."""

    path: Path
    sha256: str
    size: int
    file_count: int
    input_hash: str


def default_out_dir() -> Path:
    """Where bundles are cached: build/ in a checkout, build/eip-reclaim/ under the working directory
    for an installed package."""
    return Path.cwd() / INSTALLED_OUT_DIR if INSTALLED else DEFAULT_OUT_DIR


def build_bundle(
    *,
    out_dir: Path | None = None,
    python_version: str = DEFAULT_PYTHON_VERSION,
    payload_dir: Path = DEFAULT_PAYLOAD_DIR,
    requirements: Path | None = None,
    units_dir: Path = DEFAULT_UNITS_DIR,
    operations: Mapping[str, Sequence[str]] = KEPT_OPERATIONS,
    log: TextIO | None = None,
) -> BundleInfo:
    """Return the bundle for these inputs, building it only when no bundle of the same inputs is cached.

    ``requirements`` defaults to ``<payload_dir>/requirements.txt``, ``out_dir`` to `default_out_dir()`.
    Progress goes to ``log`` (stderr).
    """
    log = log if log is not None else sys.stderr
    out_dir = out_dir if out_dir is not None else default_out_dir()
    requirements = requirements if requirements is not None else payload_dir / "requirements.txt"
    payload_files = _payload_files(payload_dir)
    unit_files = _unit_files(units_dir)
    if not requirements.is_file():
        raise BundleError(f"payload requirements not found: {requirements}")
    input_hash = _input_hash(
        python_version=python_version,
        operations=operations,
        requirements=requirements,
        payload_dir=payload_dir,
        payload_files=payload_files,
        unit_files=unit_files,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"bundle-{input_hash[:16]}.zip"
    if target.is_file():
        return _describe(target, input_hash)

    started = time.monotonic()
    log.write(f"bundle: building {target.name} for Python {python_version} (cold cache)\n")
    with tempfile.TemporaryDirectory(prefix="eip-reclaim-bundle-") as tmp:
        stage = Path(tmp) / "stage"
        _pip_install(requirements, stage, python_version)
        log.write(f"bundle: installed pinned dependencies in {time.monotonic() - started:.1f} s\n")
        _trim(stage, operations)
        package = stage / payload_dir.name
        for src in payload_files:
            dest = package / src.relative_to(payload_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        (stage / UNITS_ARCDIR).mkdir()
        for unit in unit_files:
            shutil.copyfile(unit, stage / UNITS_ARCDIR / unit.name)
        _write_manifest(stage, python_version, operations, input_hash)
        # Written beside the target and renamed: a concurrent build of the same inputs writes the same
        # bytes, and a reader never sees a half-written zip.
        partial = Path(tmp) / target.name
        _write_zip(stage, partial)
        shutil.copyfile(partial, out_dir / f".{target.name}.{os.getpid()}")
        os.replace(out_dir / f".{target.name}.{os.getpid()}", target)

    _prune(out_dir, keep=target)
    info = _describe(target, input_hash)
    log.write(
        f"bundle: wrote {info.path} ({info.size / 1_000_000:.2f} MB, {info.file_count} files) "
        f"in {time.monotonic() - started:.1f} s\n"
    )
    return info


def _prune(out_dir: Path, *, keep: Path) -> None:
    def mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:  # pruned meanwhile by a concurrent build
            return 0.0

    bundles = sorted(out_dir.glob("bundle-*.zip"), key=mtime, reverse=True)
    for old in bundles[CACHE_KEEP:]:
        if old != keep:
            old.unlink(missing_ok=True)


def _payload_files(payload_dir: Path) -> list[Path]:
    if not (payload_dir / "__init__.py").is_file():
        raise BundleError(f"payload package not found: {payload_dir}/__init__.py")
    return sorted(p for p in payload_dir.rglob("*.py") if "__pycache__" not in p.parts)


def _unit_files(units_dir: Path) -> list[Path]:
    units = sorted(p for p in units_dir.glob("*") if p.is_file())
    if not units:
        raise BundleError(f"no systemd units in {units_dir}")
    return units


def _input_hash(
    *,
    python_version: str,
    operations: Mapping[str, Sequence[str]],
    requirements: Path,
    payload_dir: Path,
    payload_files: Iterable[Path],
    unit_files: Iterable[Path],
) -> str:
    """Hash everything that decides the bundle's bytes: options, pins, payload, units and this builder."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        # Length-prefixed, so no two different input sets can produce the same byte stream.
        for part in (label.encode(), data):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)

    add("format", str(BUILD_FORMAT).encode())
    add("builder", Path(__file__).read_bytes())
    add("python", python_version.encode())
    add("operations", json.dumps({k: list(v) for k, v in operations.items()}, sort_keys=True).encode())
    add("requirements", requirements.read_bytes())
    for path in payload_files:
        add("payload:" + path.relative_to(payload_dir).as_posix(), path.read_bytes())
    for path in unit_files:
        add("unit:" + path.name, path.read_bytes())
    return digest.hexdigest()


def _pip_install(requirements: Path, stage: Path, python_version: str) -> None:
    # --no-deps: the requirements file pins the whole closure, because pip evaluates dependency markers
    # against the interpreter running it rather than --python-version. Platform "any" with ABI "none"
    # admits only pure-Python wheels, so nothing compiled for this host can slip in.
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        "--no-deps",
        "--no-compile",
        "--require-hashes",
        "--only-binary=:all:",
        "--implementation",
        "py",
        "--abi",
        "none",
        "--platform",
        "any",
        "--python-version",
        python_version,
        "--target",
        str(stage),
        "-r",
        str(requirements),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        # pip's ERROR lines name the requirement; the rest (every version it saw) would bury them.
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
        reason = "\n".join(errors or result.stderr.splitlines()[-10:])
        raise BundleError(f"pip could not install {requirements} for Python {python_version}:\n{reason}")


def _trim(stage: Path, operations: Mapping[str, Sequence[str]]) -> None:
    """Remove what the instance never loads, and refuse anything compiled."""
    shutil.rmtree(stage / "bin", ignore_errors=True)
    for path in sorted(stage.rglob("*"), reverse=True):
        if not path.exists():
            continue
        if path.is_symlink():
            raise BundleError(f"symlink in the bundle: {path.relative_to(stage)}")
        if path.is_dir() and (path.name == "__pycache__" or (path.name in TEST_DIRS and _in_package(path))):
            shutil.rmtree(path)
        elif path.suffix in (".pyc", ".pyo"):
            path.unlink()
        elif path.name.endswith(BINARY_SUFFIXES):
            raise BundleError(f"binary extension in the bundle: {path.relative_to(stage)}")
        elif path.parent.name.endswith(".dist-info") and path.name in DIST_INFO_NOISE:
            path.unlink()
    _keep_operations(stage / "botocore" / "data", operations)
    for name in PRUNED_PATHS:
        path = stage / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()
        else:
            raise BundleError(f"expected {name} in the installed packages (did a new pin move it?)")


def _in_package(path: Path) -> bool:
    """A test directory inside an installed package (not a top-level package that happens to be called so)."""
    return (path.parent / "__init__.py").is_file()


def _keep_operations(data_dir: Path, operations: Mapping[str, Sequence[str]]) -> None:
    """botocore's data cut down to the kept operations: their models, endpoint rules and endpoints."""
    if not data_dir.is_dir():
        raise BundleError(f"expected a model directory at {data_dir}")
    prefixes = set()
    for entry in sorted(data_dir.iterdir()):
        if not entry.is_dir():
            continue  # shared files: endpoints, partitions, retry and SDK defaults
        if entry.name not in operations:
            shutil.rmtree(entry)
            continue
        # botocore loads a service's newest API version unless told otherwise.
        versions = sorted(v for v in entry.iterdir() if v.is_dir())
        for old in versions[:-1]:
            shutil.rmtree(old)
        newest = versions[-1]
        if (newest / "service-2.sdk-extras.json").exists():
            # botocore merges it into the model it loads; trimming would have to merge it first.
            raise BundleError(f"{entry.name}/{newest.name}: service-2.sdk-extras.json is not handled")
        model = _read_json(newest / "service-2")
        prefixes.add(model["metadata"]["endpointPrefix"])
        trimmed = trim_model(model, operations[entry.name], where=f"{entry.name}/{newest.name}")
        for path in sorted(newest.iterdir()):
            if not path.name.startswith(tuple(f"{name}.json" for name in KEPT_MODEL_FILES)):
                path.unlink()
        for old in newest.glob("service-2.json*"):
            old.unlink()
        # Plain JSON: the zip compresses it anyway, and the instance then has no gzip stream to inflate.
        (newest / "service-2.json").write_text(json.dumps(trimmed, separators=(",", ":")) + "\n")
    missing = sorted(set(operations) - {e.name for e in data_dir.iterdir() if e.is_dir()})
    if missing:
        raise BundleError(f"no botocore model for {', '.join(missing)}")
    _keep_endpoints(data_dir / "endpoints.json", prefixes)


def _read_json(stem: Path) -> Any:
    """A botocore data file, plain or gzipped as botocore ships the larger ones."""
    if stem.with_name(stem.name + ".json").is_file():
        return json.loads(stem.with_name(stem.name + ".json").read_text())
    with gzip.open(stem.with_name(stem.name + ".json.gz"), "rt", encoding="utf-8") as data:
        return json.load(data)


def trim_model(model: dict[str, Any], operations: Sequence[str], *, where: str = "model") -> dict[str, Any]:
    """A service model with only ``operations`` and the shapes they reach, without documentation.

    Order is kept (a query-protocol request serializes members in model order); documentation is read
    only for docstrings, which the payload never builds.
    """
    unknown = sorted(set(operations) - set(model["operations"]))
    if unknown:
        raise BundleError(f"{where}: no operation {', '.join(unknown)}")
    shapes = model["shapes"]
    kept_ops = {}
    todo: list[str] = []
    for name, operation in model["operations"].items():
        if name not in operations:
            continue
        kept_ops[name] = _undocumented(operation)
        todo += [operation[key]["shape"] for key in ("input", "output") if key in operation]
        todo += [error["shape"] for error in operation.get("errors", ())]
    reached: set[str] = set()
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo += _shape_refs(shapes[name])
    trimmed = {
        key: value for key, value in model.items() if key not in ("operations", "shapes", "documentation")
    }
    trimmed["operations"] = kept_ops
    trimmed["shapes"] = {name: _undocumented(shape) for name, shape in shapes.items() if name in reached}
    return trimmed


def _shape_refs(shape: dict[str, Any]) -> list[str]:
    """The shapes a shape names: a structure's members, a list's member, a map's key and value."""
    refs = [member["shape"] for member in shape.get("members", {}).values()]
    refs += [shape[key]["shape"] for key in ("member", "key", "value") if key in shape]
    return refs


def _undocumented(node: dict[str, Any]) -> dict[str, Any]:
    """An operation or shape without its documentation, nor its members' (member names are data, kept)."""
    copy = {key: value for key, value in node.items() if key != "documentation"}
    if "members" in copy:
        copy["members"] = {
            name: {key: value for key, value in ref.items() if key != "documentation"}
            for name, ref in copy["members"].items()
        }
    for key in ("input", "output", "member", "key", "value"):
        if key in copy:
            copy[key] = {k: v for k, v in copy[key].items() if k != "documentation"}
    if "errors" in copy:
        copy["errors"] = [
            {k: v for k, v in error.items() if k != "documentation"} for error in copy["errors"]
        ]
    return copy


def _keep_endpoints(path: Path, prefixes: set[str]) -> None:
    """endpoints.json with only the kept services' entries (1.3 MB of JSON parsed at every client's start).

    Every partition and region stays: they say which partition and DNS suffix a region belongs to.
    """
    endpoints = json.loads(path.read_text())
    for partition in endpoints["partitions"]:
        partition["services"] = {
            name: value for name, value in partition["services"].items() if name in prefixes
        }
    path.write_text(json.dumps(endpoints, separators=(",", ":")) + "\n")


def _write_manifest(
    stage: Path, python_version: str, operations: Mapping[str, Sequence[str]], input_hash: str
) -> None:
    """What was bundled, readable on the instance without Python: pins, target Python, kept models."""
    packages: dict[str, str] = {}
    for meta in sorted(stage.glob("*.dist-info/METADATA")):
        headers = HeaderParser().parsestr(meta.read_text())
        packages[headers["Name"]] = headers["Version"]
    manifest = {
        "input_hash": input_hash,
        "python_version": python_version,
        "services": list(operations),
        "operations": {service: list(names) for service, names in operations.items()},
        "packages": packages,
    }
    (stage / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _write_zip(stage: Path, dest: Path) -> None:
    """Sorted entries, one timestamp, one mode, relative names: the same tree gives the same bytes."""
    files = sorted(
        (p for p in stage.rglob("*") if p.is_file()), key=lambda p: p.relative_to(stage).as_posix()
    )
    with zipfile.ZipFile(dest, "w") as archive:
        for path in files:
            info = zipfile.ZipInfo(path.relative_to(stage).as_posix(), date_time=ZIP_EPOCH)
            info.create_system = 3  # Unix, so external_attr carries a file mode
            info.external_attr = 0o100644 << 16  # regular file, rw-r--r--
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes(), compresslevel=9)


def _describe(path: Path, input_hash: str) -> BundleInfo:
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        file_count = len(archive.namelist())
    return BundleInfo(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        file_count=file_count,
        input_hash=input_hash,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stacks.bundle``: build (or find) the bundle and print what it is."""
    parser = argparse.ArgumentParser(prog="python -m stacks.bundle", description=__doc__)
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--python-version", default=DEFAULT_PYTHON_VERSION)
    args = parser.parse_args(argv)
    try:
        info = build_bundle(out_dir=args.out_dir, python_version=args.python_version)
    except BundleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({k: str(v) for k, v in vars(info).items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
