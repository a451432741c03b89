"""Where the sockets and the databases live by default (SPEC.md section 2).

Its own module so the ops CLI learns the defaults without loading the daemon.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def default_runtime_dir() -> Path:
    for variable in ("PAIR_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        value = os.environ.get(variable)
        if value:
            return Path(value.split(":")[0])
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "pair" if xdg else Path(".pair/run")


# Where deploy/systemd's socket units put the sockets.
INSTALLED_RUNTIME_DIR = Path("/run/pair")


def client_runtime_dir() -> tuple[Path, str]:
    """Where a client such as pairctl finds the sockets, and what chose that place.

    A daemon's environment names its directory; an operator's shell does not, so
    after `$PAIR_RUNTIME_DIR` the installed units' directory wins over the
    development default, whatever the current directory.
    """
    return _client_dir("PAIR_RUNTIME_DIR", INSTALLED_RUNTIME_DIR, default_runtime_dir)


def default_state_dir() -> Path:
    for variable in ("PAIR_STATE_DIR", "STATE_DIRECTORY"):
        value = os.environ.get(variable)
        if value:
            return Path(value.split(":")[0])
    return Path(".pair/state")


# Where deploy/systemd's units keep the databases (StateDirectory=pair).
INSTALLED_STATE_DIR = Path("/var/lib/pair")


def client_state_dir() -> tuple[Path, str]:
    """Where a client such as `pairctl restore` finds the databases, and what chose it,
    in the order `client_runtime_dir` looks."""
    return _client_dir("PAIR_STATE_DIR", INSTALLED_STATE_DIR, default_state_dir)


def _client_dir(variable: str, installed: Path, default: Callable[[], Path]) -> tuple[Path, str]:
    value = os.environ.get(variable)
    if value:
        return Path(value), f"from ${variable}"
    if installed.is_dir():
        return installed, "the installed units' directory"
    return default(), "the development default"
