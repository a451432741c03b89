"""Where the sockets and the databases live by default (SPEC.md section 2).

Its own module so the ops CLI learns the defaults without loading the daemon.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_runtime_dir() -> Path:
    for variable in ("PAIR_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        value = os.environ.get(variable)
        if value:
            return Path(value.split(":")[0])
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "pair" if xdg else Path(".pair/run")


def default_state_dir() -> Path:
    for variable in ("PAIR_STATE_DIR", "STATE_DIRECTORY"):
        value = os.environ.get(variable)
        if value:
            return Path(value.split(":")[0])
    return Path(".pair/state")
