"""What reached stable storage, recorded for the power-cut test tier (tests/crash/).

Off unless `PAIR_POWERCUT_SHADOW` names a directory (the tier sets it, the way
`PAIR_FAILPOINT` arms a failpoint); off, every hook is one test of a module
constant and production does exactly what it did without this module.

On, each process keeps a shadow of the disk as a power cut would leave it, under
`$PAIR_POWERCUT_SHADOW`, for the files under `$PAIR_POWERCUT_ROOT`:

    files/<dev>_<ino>        an inode's content as of its last fsync
    dirs/<dev>_<ino>.json    a directory's entries as of its last fsync: name ->
                             [kind, inode key]
    pids/<pid>               every process that records (the cut kills them all)
    OFF                      the power is off: a process that sees it records nothing
                             more and never returns from the call that saw it

A write no fsync covered is in no shadow, and neither is a create, rename or
unlink whose directory was not fsynced: rebuilt from the shadow, the tree is
what the disk holds after the cut. The shadow is updated inside the fsync,
before it returns: what a caller was told is durable, the shadow has.

`PAIR_POWERCUT_AT=N` cuts the power in this process at its N-th recorded
operation (writes, syncs, creates, directory syncs), before that operation
reaches the disk. To prove the tier sees a loss: `PAIR_POWERCUT_SKIP=dir-sync`
drops our own directory fsyncs, `PAIR_POWERCUT_SYNCHRONOUS=OFF` opens every
database with synchronous=OFF.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import threading
import time
from collections.abc import Iterable

SHADOW = os.environ.get("PAIR_POWERCUT_SHADOW", "")
ROOT = os.path.realpath(os.environ.get("PAIR_POWERCUT_ROOT", "/nonexistent")) + os.sep
SKIP = os.environ.get("PAIR_POWERCUT_SKIP", "")
# The tier's proof that it sees a loss: every database opened with this instead (OFF).
SYNCHRONOUS = os.environ.get("PAIR_POWERCUT_SYNCHRONOUS", "").upper() if SHADOW else ""
ENABLED = bool(SHADOW)
# `N` (the N-th recorded operation) or `KIND:N` (the N-th of that kind: write,
# db-write, truncate, sync, create, dir-sync).
_CUT_KIND, _, _CUT_N = os.environ.get("PAIR_POWERCUT_AT", "").rpartition(":")
_CUT_AT = int(_CUT_N or 0)
_ops = 0
_counted = 0
_lock = threading.Lock()


def key_of(found: os.stat_result) -> str:
    return f"{found.st_dev}_{found.st_ino}"


def watched(path: str) -> bool:
    return ENABLED and (path + os.sep).startswith(ROOT)


def _register() -> None:
    """Name this process among those the cut kills."""
    os.makedirs(os.path.join(SHADOW, "pids"), exist_ok=True)
    with open(os.path.join(SHADOW, "pids", str(os.getpid())), "w"):
        pass


def operation(kind: str) -> None:
    """One recorded operation: the power may go here (and then this never returns)."""
    global _ops, _counted
    with _lock:
        if _ops == 0:
            _register()
        _ops += 1
        if kind == _CUT_KIND or not _CUT_KIND:
            _counted += 1
        due = _CUT_AT and _counted >= _CUT_AT
    if due:
        cut()
    if os.path.exists(os.path.join(SHADOW, "OFF")):
        _dark()


def cut() -> None:
    """The power goes: every recording process is killed at once, this one last."""
    try:
        fd = os.open(os.path.join(SHADOW, "OFF"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    kill_all(SHADOW, but=os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def kill_all(shadow: str, but: int | None = None) -> None:
    for name in os.listdir(os.path.join(shadow, "pids")):
        if int(name) != but:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(name), signal.SIGKILL)


def _dark() -> None:
    """The power is off: nothing more reaches the disk, and nothing returns."""
    while True:
        time.sleep(3600)


def file_created(path: str) -> None:
    """A new inode at `path`: whatever an earlier inode of that number held is gone."""
    if watched(path):
        operation("create")
        found = os.lstat(path)
        _remove(os.path.join(SHADOW, "files", key_of(found)))


def file_synced(fd: int, ranges: Iterable[tuple[int, bytes]] | None = None) -> None:
    """The file open on `fd` was fsynced: `ranges` (offset, data) written since the last
    sync (a VFS file keeps them), or else all of it, are now durable, at its size now."""
    if _watched_path(fd) is None:
        return
    operation("sync")
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode):
        return
    shadow = os.path.join(SHADOW, "files", key_of(found))
    os.makedirs(os.path.dirname(shadow), exist_ok=True)
    out = os.open(shadow, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if ranges is None:
            reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
            try:
                offset = 0
                while chunk := os.pread(reader, 1 << 20, offset):
                    os.pwrite(out, chunk, offset)
                    offset += len(chunk)
            finally:
                os.close(reader)
        else:
            for offset, data in ranges:
                os.pwrite(out, data, offset)
        os.ftruncate(out, found.st_size)
    finally:
        os.close(out)


def dir_synced(fd: int) -> None:
    """The directory open on `fd` was fsynced: its entries as they are now are durable."""
    path = _watched_path(fd)
    if path is None:
        return
    operation("dir-sync")
    dir_entries_durable(path)


def _watched_path(fd: int) -> str | None:
    """The path of what is open on `fd` when the tier records it, else None."""
    if not ENABLED:
        return None
    path = os.readlink(f"/proc/self/fd/{fd}")
    return path if watched(path) else None


def dir_entries_durable(path: str) -> None:
    entries = {}
    for name in os.listdir(path):
        try:
            found = os.lstat(os.path.join(path, name))
        except FileNotFoundError:
            continue
        if stat.S_ISREG(found.st_mode):
            entries[name] = ["file", key_of(found)]
        elif stat.S_ISDIR(found.st_mode):
            entries[name] = ["dir", key_of(found)]
    directory = os.path.join(SHADOW, "dirs")
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, key_of(os.stat(path)) + ".json")
    temporary = f"{target}.{os.getpid()}.{threading.get_ident()}"
    with open(temporary, "w") as out:
        json.dump(entries, out)
    os.replace(temporary, target)


def skipped(what: str) -> bool:
    """Whether the tier asked to drop our own `what` (to prove it sees the loss)."""
    return ENABLED and what == SKIP


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
