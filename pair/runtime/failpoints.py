"""Crash points for fault tests: `PAIR_FAILPOINT=name` makes the process SIGKILL itself there.

Lets a test kill a daemon at an exact step (between two writes that must
both survive a crash) with a real signal, instead of hoping a timed kill
lands there. Unset in production; a check of one environment variable.
"""

from __future__ import annotations

import os
import signal

_ARMED = os.environ.get("PAIR_FAILPOINT", "")


def failpoint(name: str) -> None:
    if _ARMED and name == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
