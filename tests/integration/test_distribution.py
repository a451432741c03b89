"""The distribution holds everything the daemons import (what `pip install .` deploys)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_built_wheel_holds_every_module_the_daemons_and_the_cli_import(
    tmp_path: Path,
) -> None:
    # From a copy of the files git knows, as a fresh clone has them: no build/
    # or egg-info left by an earlier build may fill in what the config misses.
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    source = tmp_path / "source"
    for name in listed:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("pair_daemons-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    probe = (
        "import pair.assistant.app, pair.gateway.app, pair.ctl.cli, pair.runtime.sqlite,"
        " pair.protocol.server, pair.testing.plugin; "
        "print(pair.runtime.sqlite.__file__, pair.assistant.app.__file__,"
        " pair.testing.plugin.__file__)"
    )
    # Outside the checkout, with the unpacked wheel first on the path: nothing
    # may come from the source tree.
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert all(path.startswith(str(tmp_path / "site")) for path in result.stdout.split())
    # The pytest plugin is registered for whoever installs the wheel.
    (entry_points,) = (tmp_path / "site").glob("pair_daemons-*.dist-info/entry_points.txt")
    assert "[pytest11]\npair = pair.testing.plugin" in entry_points.read_text()
    # One top-level package: nothing of ours collides with another project's
    # `protocol` or `runtime` module.
    (top_level,) = (tmp_path / "site").glob("pair_daemons-*.dist-info/top_level.txt")
    assert top_level.read_text().split() == ["pair"]
    installed = {path.name for path in (tmp_path / "site").iterdir()}
    assert {name for name in installed if not name.endswith(".dist-info")} == {"pair"}
