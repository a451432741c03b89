"""Whom pairctl trusts with the files it touches, often as root: root, the user running
it, and the daemon user of the install (`pair`, deploy/'s sysusers.d). A socket, a
state directory or a daemon's backup/ owned by anyone else is refused, and so is a
directory others can write; as root, pairctl never looks in the current directory."""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from pathlib import Path

from pair.runtime.files import Dir, UnsafePath, owner_name

DAEMON_USER = "pair"


def trusted_owners() -> frozenset[int]:
    owners = {0, os.geteuid()}
    with contextlib.suppress(KeyError):
        owners.add(pwd.getpwnam(DAEMON_USER).pw_uid)
    return frozenset(owners)


def check_socket(path: str) -> None:
    """Refuse a socket that is not one, or that someone untrusted owns or could swap."""
    socket = Path(path)
    with Dir.open(socket.parent, trusted=trusted_owners()) as directory:
        found = directory.lstat(socket.name)
    if found is None:
        return  # nothing to trust: connecting says it is not there
    if not stat.S_ISSOCK(found.st_mode):
        raise UnsafePath(f"refusing {socket.absolute()}: it is not a socket")
    check_owner(found.st_uid, f"{socket.absolute()}")


def check_owner(uid: int, what: str) -> None:
    trusted = trusted_owners()
    if uid not in trusted:
        allowed = ", ".join(owner_name(owner) for owner in sorted(trusted))
        raise UnsafePath(f"refusing {what}: it belongs to {owner_name(uid)}, not to {allowed}")


def refuse_relative_as_root(path: Path, flag: str, variable: str) -> None:
    """As root, a default that names the current directory is refused: whoever owns it
    would choose what root reads and writes."""
    if os.geteuid() == 0 and not path.is_absolute():
        raise UnsafePath(
            f"as root, pairctl does not use {path} in the current directory ({Path.cwd()});"
            f" name the directory with {flag} DIR or ${variable}"
        )
