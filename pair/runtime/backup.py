"""A daemon's online snapshot of its database: the `backup` method's work.

The snapshot is `VACUUM INTO` from a connection of its own, opened read-only
for the one call: one read transaction, so the copy is one committed state
of the database, and in WAL mode it blocks no writer and no reader (the
daemon's callers never wait on it; the GIL is released inside the one
SQLite step). It is written to a temporary name beside its final one in
`<state>/backup/`, fsynced, renamed, and the directory fsynced: a file of
that directory without the temporary suffix is whole. The daemon writes
there because its unit lets it write nowhere else (ProtectSystem=strict);
`pairctl backup` copies the files into its bundle and removes them.
"""

from __future__ import annotations

import errno
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import apsw
from msgspec import Struct

from pair import __version__
from pair.protocol.backup import (
    BackupBusy,
    BackupFailed,
    BackupNoSpace,
    BackupResult,
    SnapshotFile,
)
from pair.protocol.dispatch import NoParams
from pair.runtime.failpoints import failpoint
from pair.runtime.files import Dir, UnsafePath, copy_hashed, fsync, hash_of
from pair.runtime.sqlite.powercut_vfs import vfs_name

log = logging.getLogger("runtime.backup")

SNAPSHOT_DIR = "backup"
TEMPORARY = ".partial"
# Snapshots a `pairctl backup` did not collect (it was killed) are removed by the next
# backup once this old.
UNCOLLECTED_AFTER = 3600.0

Marks = Callable[[apsw.Connection], dict[str, int]]


class BackupStats(Struct, rename="camel", kw_only=True):
    """The daemon's backups so far (the `metrics` method)."""

    count: int = 0
    failures: int = 0
    last_at: int | None = None
    last_bytes: int | None = None


class Snapshotter:
    """Takes one daemon's snapshots, one at a time, and counts them."""

    def __init__(
        self,
        daemon: str,
        db_path: str,
        marks: Marks,
        *,
        extra: Sequence[tuple[str, str]] = (),
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.daemon = daemon
        self.db_path = db_path
        self.marks = marks
        # Each extra file: where it is, and its name in a bundle.
        self.extra = tuple((Path(path), name) for path, name in extra)
        self.busy_timeout_ms = busy_timeout_ms
        self.into = Path(db_path).parent / SNAPSHOT_DIR
        self.stats = BackupStats()
        self._lock = threading.Lock()

    def take(self) -> BackupResult:
        """Snapshot the database and the `extra` files (blocking; call off the loop)."""
        if not self._lock.acquire(blocking=False):
            raise BackupBusy(f"{self.daemon}: a backup is already being taken; retry when it ends")
        try:
            started = time.monotonic()
            try:
                result = self._take()
            except (OSError, apsw.Error, UnsafePath) as exc:
                self.stats.failures += 1
                raise _failure(self.daemon, self.into, exc) from exc
            size = sum(file.bytes for file in result.files)
            self.stats.count += 1
            self.stats.last_at = result.taken_at
            self.stats.last_bytes = size
            log.info(
                "backup: %s snapshot of %d bytes in %s (%.2fs)",
                self.daemon, size, self.into, time.monotonic() - started,
            )  # fmt: skip
            return result
        finally:
            self._lock.release()

    def _take(self) -> BackupResult:
        with Dir.open(self.into, create=True) as into:
            self._remove_leftovers(into)
            stamp = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"
            taken_at = int(time.time() * 1000)
            try:
                files, schema_version, high_water = self._write(into, stamp)
            except BaseException:
                for leftover in into.names():
                    if leftover.startswith(f"{stamp}."):
                        into.unlink(leftover, missing_ok=True)
                raise
            into.sync()
        return BackupResult(
            daemon=self.daemon,
            version=__version__,
            sqlite_version=apsw.sqlite_lib_version(),
            schema_version=schema_version,
            taken_at=taken_at,
            high_water=high_water,
            files=files,
        )

    def _write(self, into: Dir, stamp: str) -> tuple[list[SnapshotFile], int, dict[str, int]]:
        """The database's snapshot, then the extra files, each sealed under its name."""
        name = Path(self.db_path).name
        partial = f"{stamp}.{name}{TEMPORARY}"
        source = apsw.Connection(self.db_path, flags=apsw.SQLITE_OPEN_READONLY, vfs=vfs_name())
        try:
            source.set_busy_timeout(self.busy_timeout_ms)
            # VACUUM INTO takes a path: `into` is the daemon's own 0700 directory.
            source.execute("VACUUM INTO ?", (str(into.path / partial),))
        finally:
            source.close()
        failpoint("backup.snapshot_written")
        copy = apsw.Connection(str(into.path / partial), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            schema_version = schema_version_of(copy)
            high_water = self.marks(copy)
        finally:
            copy.close()
        with into.open_regular(partial) as written:
            size, digest = hash_of(written)
            fsync(written)
        files = [_sealed(into, partial, stamp, name, size, digest)]
        for extra, bundle_name in self.extra:
            partial = f"{stamp}.{bundle_name}{TEMPORARY}"
            with (
                Dir.open(extra.parent) as where,
                where.open_regular(extra.name) as reader,
                into.create(partial) as out,
            ):
                size, digest = copy_hashed(reader, out)
            files.append(_sealed(into, partial, stamp, bundle_name, size, digest))
        return files, schema_version, high_water

    def _remove_leftovers(self, into: Dir) -> None:
        """Files of a snapshot cut short (the daemon was killed), and snapshots nobody
        collected within `UNCOLLECTED_AFTER`."""
        now = time.time()
        # Only this daemon's: both daemons' units share one state directory.
        own = {Path(self.db_path).name, *(name for _, name in self.extra)}
        for entry in into.names():
            if entry.removesuffix(TEMPORARY).partition(".")[2] not in own:
                continue
            found = into.lstat(entry)
            if found is not None and (
                entry.endswith(TEMPORARY) or now - found.st_mtime > UNCOLLECTED_AFTER
            ):
                into.unlink(entry, missing_ok=True)


def _sealed(into: Dir, partial: str, stamp: str, name: str, size: int, digest: str) -> SnapshotFile:
    """Give a written, fsynced snapshot file its final name."""
    final = f"{stamp}.{name}"
    into.rename(partial, final)
    return SnapshotFile(name=name, path=str(into.path / final), bytes=size, sha256=digest)


def _failure(daemon: str, into: Path, exc: BaseException) -> BackupFailed | BackupNoSpace:
    no_space = isinstance(exc, apsw.FullError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    )
    if no_space:
        message = f"{daemon}: no space left for the snapshot in {into}; nothing was kept"
    else:
        message = f"{daemon}: the snapshot in {into} failed ({exc}); nothing was kept"
    log.error("backup: %s", message)
    return BackupNoSpace(message) if no_space else BackupFailed(message)


def method_of(snapshots: Snapshotter) -> Callable[[NoParams], BackupResult]:
    """The `backup` method's handler (admin only; runs in a thread)."""

    def backup(params: NoParams) -> BackupResult:
        """Snapshot this daemon's database (and its key, for the gateway) into its state
        directory's backup/ and name the files: one committed state, taken through a
        connection of its own, so no caller waits on it. For `pairctl backup`, which
        copies the files into its bundle and removes them. Only for the daemon's own uid
        and root."""
        return snapshots.take()

    return backup


def schema_version_of(db: apsw.Connection) -> int:
    value: Any = db.execute("PRAGMA user_version").fetchall()[0][0]
    return int(value)
