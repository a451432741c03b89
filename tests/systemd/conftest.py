"""One real systemd for the tier, the pair installed in it by deploy/install.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.machine import Machine, why_not

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "deploy" / "requirements-runtime.lock"
SYSTEM_PYTHON = "/usr/bin/python3"


def install(machine: Machine) -> None:
    """deploy/install.sh inside the machine, from the locked wheels."""
    wheelhouse = str(_wheelhouse())
    machine.run("sh", str(ROOT / "deploy" / "install.sh"), "--wheelhouse", wheelhouse, timeout=300)


def _wheelhouse() -> Path:
    """The locked runtime wheels, downloaded on the host: the machine has no network."""
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wheelhouse = ROOT / ".pair" / f"wheelhouse-{version}"
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    only = ["--no-deps", "--require-hashes", "--only-binary=:all:", "--python-version", version]
    subprocess.run([*pip, *only, "-r", str(LOCK), "-d", str(wheelhouse)], check=True)
    return wheelhouse


@pytest.fixture(scope="session")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    reason = why_not()
    if reason is not None:
        if os.environ.get("PAIR_REQUIRE_SYSTEMD"):
            pytest.fail(f"PAIR_REQUIRE_SYSTEMD is set, but: {reason}")
        pytest.skip(f"the real-systemd tier cannot run here: {reason}")
    booted = Machine(tmp_path_factory.mktemp("systemd"))
    try:
        booted.boot()
        install(booted)
        yield booted
    finally:
        booted.kill()
