"""Why a daemon cannot start: one line on stderr and a sysexits(3) exit code."""

from __future__ import annotations

# sysexits(3) codes a daemon exits with when it cannot start.
EX_DATAERR = 65
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78


class StartupError(Exception):
    """A daemon cannot start: printed as one line on stderr, then exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ListenerError(StartupError):
    """The socket cannot be bound or inherited (a live daemon on it, a bad path, permissions)."""


class DbOpenError(StartupError):
    """The database (or the gateway's key) cannot be opened or migrated."""
