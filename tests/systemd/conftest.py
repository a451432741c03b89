"""One real systemd for the tier, the pair installed in it by deploy/install.sh."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from tests.skew.release import export_previous
from tests.systemd.machine import Machine, why_not

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "deploy" / "requirements-runtime.lock"
SYSTEM_PYTHON = "/usr/bin/python3"


def unavailable(reason: str) -> NoReturn:
    """Skip: the tier cannot run here; but CI (PAIR_REQUIRE_SYSTEMD) fails instead."""
    if os.environ.get("PAIR_REQUIRE_SYSTEMD"):
        pytest.fail(f"PAIR_REQUIRE_SYSTEMD is set, but: {reason}")
    pytest.skip(f"the real-systemd tier cannot run here: {reason}")


def install(machine: Machine) -> None:
    """deploy/install.sh inside the machine, from the locked wheels."""
    wheelhouse = str(wheelhouse_for(LOCK))
    machine.run("sh", str(ROOT / "deploy" / "install.sh"), "--wheelhouse", wheelhouse, timeout=300)


def wheelhouse_for(lock: Path) -> Path:
    """The wheels of a runtime lock, downloaded on the host: the machine has no network."""
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wheelhouse = ROOT / ".pair" / f"wheelhouse-{version}"
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    only = ["--no-deps", "--require-hashes", "--only-binary=:all:", "--python-version", version]
    subprocess.run([*pip, *only, "-r", str(lock), "-d", str(wheelhouse)], check=True)
    return wheelhouse


@pytest.fixture(scope="session")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    reason = why_not()
    if reason is not None:
        unavailable(reason)
    booted = Machine(tmp_path_factory.mktemp("systemd"))
    try:
        booted.boot()
        install(booted)
        yield booted
    finally:
        booted.kill()


@dataclass(frozen=True)
class Release:
    """One release's three packages, where the machine can read them."""

    version: str
    debs: dict[str, str]

    def all(self) -> list[str]:
        return [self.debs[name] for name in PACKAGES]


PACKAGES = ("pair", "pair-gateway", "pair-assistant")


@pytest.fixture(scope="session")
def releases() -> dict[str, Release]:
    """This tree's packages ("current") and the previous release's ("previous"), the
    latter's code from its commit with this tree's packaging, as deploy/build-deb does."""
    if shutil.which("dpkg-buildpackage") is None or shutil.which("lintian") is None:
        unavailable("no dpkg-buildpackage or lintian (Debian: apt-get install debhelper lintian)")
    # Under the checkout, which the machine mounts: its /tmp is its own.
    out = ROOT / ".pair" / "debs"
    shutil.rmtree(out, ignore_errors=True)
    built = {"current": _build(ROOT, out / "current")}
    with tempfile.TemporaryDirectory(prefix="pair-previous-") as source:
        export_previous(Path(source))
        built["previous"] = _build(Path(source), out / "previous")
    return built


def _build(source: Path, out: Path) -> Release:
    wheelhouse = wheelhouse_for(source / "deploy" / "requirements-runtime.lock")
    build = [SYSTEM_PYTHON, str(ROOT / "deploy" / "build-deb"), "--wheelhouse", str(wheelhouse)]
    printed = subprocess.run(
        [*build, "--source", str(source), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert printed.returncode == 0, printed.stderr[-4000:]
    debs = {Path(line).name.split("_")[0]: line for line in printed.stdout.split()}
    version = Path(debs["pair"]).name.split("_")[1]
    return Release(version, debs)
