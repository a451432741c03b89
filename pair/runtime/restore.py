"""The restore protocol: what `pairctl restore` does to a state directory, and what the
daemons make of it. Both sides read it here; they share no other word.

    STATE/.lock           each daemon holds a shared flock on it for its whole life;
                          a restore holds it exclusively for its whole run, so no
                          daemon starts during one and none may run when it begins
    STATE/<name>.restoring  a bundle's file, copied (0600) and verified, not yet in place
    STATE/RESTORING       the swap is under way: every incoming file is whole, and the
                          swap rolls forward from wherever it stopped (`resume`); no
                          daemon starts while it exists
    STATE/pre-restore/    the files the swap replaced (each database with its -wal and
                          -shm, the key), kept until the operator runs
                          `pairctl restore --finish`; never removed by a daemon

The swap is all or nothing across both databases and the key: every incoming
file is copied and checked before the marker is written, and a swap cut short
(a kill, a power cut) is finished by `pairctl restore --resume`, never left
half-applied by a daemon's start.

Stdlib only: pairctl imports it without apsw.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pair.runtime.errors import EX_CANTCREAT, EX_TEMPFAIL, StartupError
from pair.runtime.failpoints import failpoint
from pair.runtime.files import Dir, UnsafePath, replace_atomically

log = logging.getLogger("runtime.restore")

# What each daemon's snapshot holds, in the order the swap takes them: its database
# first, then its other files.
FILES = {"gateway": ("gateway.db", "gateway.key"), "assistant": ("assistant.db",)}
ALL_FILES = tuple(name for names in FILES.values() for name in names)
DATABASES = tuple(names[0] for names in FILES.values())
LOCK = ".lock"
MARKER = "RESTORING"
KEPT_ASIDE = "pre-restore"
INCOMING = ".restoring"
MARKER_LIMIT = 64 * 1024


class RestoreError(Exception):
    """A restore cannot start, continue or finish; the message says why and what to do."""


def open_lock(state: Dir, owner: tuple[int, int] | None = None) -> BinaryIO:
    """`STATE/.lock`, made (0600, given to `owner`) when missing: a regular file only."""
    try:
        lock = state.create(LOCK)
    except FileExistsError:
        return state.open_regular(LOCK)
    if owner is not None:
        os.fchown(lock.fileno(), *owner)
    return lock


def hold_for_daemon(state_dir: Path, daemon: str) -> BinaryIO:
    """The shared lock a daemon holds for its life (keep the file open); refuses to
    start while a restore runs or was cut short (the marker is looked for once the
    lock is held: a restore cannot write it after)."""
    state, lock = _state_and_lock(state_dir)
    with state:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StartupError(
                f"a restore is running in {state_dir.absolute()} (pairctl holds {LOCK}"
                " there): start again once it has ended",
                EX_TEMPFAIL,
            ) from None
        marker = state.lstat(MARKER) is not None
        kept = state.lstat(KEPT_ASIDE) is not None
    if marker:
        lock.close()
        raise StartupError(cut_short(state_dir), EX_TEMPFAIL)
    if kept:
        log.warning(
            "%s: %s holds the files a restore replaced; `pairctl restore --finish` removes"
            " them once the restored state is right",
            daemon, state_dir.absolute() / KEPT_ASIDE,
        )  # fmt: skip
    return lock


def _state_and_lock(state_dir: Path) -> tuple[Dir, BinaryIO]:
    """The state directory (made when missing) and its lock file, open."""
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        state = Dir.open(state_dir)
    except (OSError, UnsafePath) as exc:
        raise _unopenable(state_dir, exc) from exc
    try:
        return state, open_lock(state)
    except (OSError, UnsafePath) as exc:
        state.close()
        raise _unopenable(state_dir, exc) from exc


def _unopenable(state_dir: Path, exc: Exception) -> StartupError:
    reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    if isinstance(exc, FileExistsError):
        reason = "it exists and is not a directory"
    where = state_dir.absolute()
    return StartupError(f"cannot open the state directory {where}: {reason}", EX_CANTCREAT)


def cut_short(state_dir: Path) -> str:
    where = state_dir.absolute()
    return (
        f"a restore into {where} was cut short ({where / MARKER} is there): run"
        f" `pairctl --state-dir {where} restore --resume` to finish it (its files were"
        " copied and checked before the swap began)"
    )


def lock_for_restore(state: Dir, *, beside_daemons: bool = False) -> BinaryIO:
    """The exclusive lock a restore holds for its whole run, refused while a daemon holds
    its shared one; `beside_daemons`, a shared one (`--finish` runs beside the pair, never
    beside a restore)."""
    found = state.stat()
    lock = open_lock(state, (found.st_uid, found.st_gid) if os.geteuid() == 0 else None)
    try:
        fcntl.flock(
            lock.fileno(), (fcntl.LOCK_SH if beside_daemons else fcntl.LOCK_EX) | fcntl.LOCK_NB
        )
    except BlockingIOError:
        lock.close()
        if beside_daemons:
            raise RestoreError(
                f"a restore into {state.path} is running: retry once it has ended"
            ) from None
        raise RestoreError(
            f"a daemon is running on {state.path} (it holds {state.path / LOCK}): stop both"
            " daemons and their sockets first"
        ) from None
    return lock


def write_marker(state: Dir, bundle: str, names: Iterable[str]) -> None:
    record = {"bundle": bundle, "startedAt": int(time.time() * 1000), "files": list(names)}
    replace_atomically(state, MARKER, json.dumps(record).encode())


def marker_of(state: Dir) -> dict[str, object] | None:
    """What the marker of a restore cut short says, or None when there is none."""
    if state.lstat(MARKER) is None:
        return None
    try:
        record = json.loads(state.read_small(MARKER, MARKER_LIMIT))
    except (ValueError, UnsafePath) as exc:
        raise RestoreError(f"{state.path / MARKER} cannot be read ({exc})") from exc
    if not isinstance(record, dict):
        raise RestoreError(f"{state.path / MARKER} is not a restore's marker")
    return record


@dataclass(slots=True)
class Progress:
    """How far a swap got: the names moved into pre-restore/, the names put in place."""

    moved: list[str] = field(default_factory=list)
    placed: list[str] = field(default_factory=list)


def swap(state: Dir, names: Iterable[str], progress: Progress) -> None:
    """Put each incoming `<name>.restoring` in place of `<name>`, the replaced files
    (a database's -wal and -shm with it) moved into pre-restore/; rolls forward from
    wherever an earlier swap stopped."""
    with state.subdir(KEPT_ASIDE, create=True) as aside:
        for name in names:
            if state.lstat(name + INCOMING) is None:
                continue
            companions = (name + "-wal", name + "-shm") if name in DATABASES else ()
            for current in (*companions, name):
                if state.lstat(current) is not None:
                    if aside.lstat(current) is not None:
                        raise RestoreError(
                            f"{aside.path / current} is already there: nothing kept aside is"
                            " ever replaced; move it away, then `pairctl restore --resume`"
                        )
                    state.rename(current, current, into=aside)
                    progress.moved.append(current)
            failpoint("restore.swap_moved_aside")
            state.rename(name + INCOMING, name)
            progress.placed.append(name)
        aside.sync()
    state.sync()


def undo_swap(state: Dir, progress: Progress) -> None:
    """Put back what `swap` did (the incoming files back to `.restoring`, the moved
    ones back in place): a swap that failed midway leaves the old state whole."""
    for name in reversed(progress.placed):
        state.rename(name, name + INCOMING)
    with state.subdir(KEPT_ASIDE) as aside:
        for current in reversed(progress.moved):
            aside.rename(current, current, into=state)
        aside.sync()
    state.sync()
    with contextlib.suppress(OSError):
        state.rmdir(KEPT_ASIDE)


def finish(state: Dir) -> bool:
    """Remove the files the last restore replaced (the operator has said the restored
    state is right); whether there were any."""
    if state.lstat(KEPT_ASIDE) is None:
        return False
    state.remove_tree(KEPT_ASIDE)
    state.sync()
    return True
