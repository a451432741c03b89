"""Why a daemon cannot start: one line on stderr and a sysexits(3) exit code."""

from __future__ import annotations

# The exit codes of the daemons (when they cannot start) and of pairctl, in one place:
# sysexits(3) where one fits.
EX_OK = 0
EX_HANDLER = 1  # pairctl: the daemon answered an error, or an answer it cannot read
EX_USAGE = 2  # pairctl: bad arguments, or a path it refuses to trust
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
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
