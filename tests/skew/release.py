"""The previous release, installed into a venv of its own from its git tag.

Built once per release commit under `.pair/release-<version>/` (reused by later runs;
`make clean` removes it): the release's own `deploy/requirements-runtime.lock`, then the
release itself, built offline by the locked setuptools, as `deploy/install.sh` does.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _last_release() -> tuple[str, str]:
    """The newest row of RELEASES.md: the release before this tree, and its commit
    (for a clone made without tags)."""
    rows = re.findall(
        r"^\| ([0-9][^ |]*) \| ([0-9a-f]{40}) \|", (ROOT / "RELEASES.md").read_text(), re.M
    )
    version, commit = rows[-1]
    return version, commit


PREVIOUS, PREVIOUS_COMMIT = _last_release()


def previous_python() -> tuple[str, ...]:
    """The interpreter of the previous release's venv, with -P: the checkout in the
    current directory must not shadow the release's own package."""
    home = ROOT / ".pair" / f"release-{PREVIOUS}"
    python = home / "venv" / "bin" / "python"
    marker = home / "installed"
    if not (marker.exists() and marker.read_text() == PREVIOUS_COMMIT):
        _install(home)
        marker.write_text(PREVIOUS_COMMIT)
    return (str(python), "-P")


def _install(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    venv = home / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    with tempfile.TemporaryDirectory(prefix="release-") as source:
        export_previous(Path(source))
        lock = Path(source) / "deploy" / "requirements-runtime.lock"
        subprocess.run([*pip, "--require-hashes", "--no-deps", "-r", str(lock)], check=True)
        subprocess.run(
            [*pip, "--no-deps", "--no-build-isolation", "--no-index", source], check=True
        )


def export_previous(destination: Path) -> None:
    """The previous release's tree, as its commit holds it, into `destination`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", _commit()],
        capture_output=True,
        check=True,
    ).stdout
    with tempfile.TemporaryFile() as tar:
        tar.write(archive)
        tar.seek(0)
        with tarfile.open(fileobj=tar) as release:
            release.extractall(destination, filter="data")


def _commit() -> str:
    """The tag's commit when the clone has the tag, else the recorded one."""
    tagged = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"v{PREVIOUS}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return tagged or PREVIOUS_COMMIT
