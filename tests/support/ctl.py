"""pairctl as a user runs it: a process of its own, its output and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pair.testing import Pair


def pairctl(
    pair_or_root: Pair | Path, *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """pairctl in a process of its own, on the pair's runtime and state directories."""
    if isinstance(pair_or_root, Pair):
        runtime, state = pair_or_root.runtime, pair_or_root.state
    else:
        runtime, state = pair_or_root / "run", pair_or_root / "state"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pair.ctl",
            "--runtime-dir",
            str(runtime),
            "--state-dir",
            str(state),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


def json_of(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value
