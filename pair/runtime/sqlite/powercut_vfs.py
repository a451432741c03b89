"""The power-cut tier's SQLite VFS: the default VFS, with each file's writes kept until
its fsync hands them to `pair.runtime.powercut` (the shadow of what is durable).

Registered only when the tier turns recording on (`powercut.ENABLED`); `connect`
then opens every database through it. Reads, locks and the WAL's shared memory
pass through to the default VFS untouched. A WAL or journal that SQLite creates
is fsynced with its directory on its first sync (the unix VFS does that
itself), so its first sync makes its directory's entries durable too.
"""

from __future__ import annotations

import os
from typing import Any

import apsw

from pair.runtime import powercut

NAME = "pair-powercut"
# The files SQLite fsyncs its directory for when it creates them (os_unix.c).
_DIRSYNC_TYPES = (
    apsw.SQLITE_OPEN_WAL | apsw.SQLITE_OPEN_MAIN_JOURNAL | apsw.SQLITE_OPEN_SUPER_JOURNAL
)


class RecordingFile(apsw.VFSFile):
    def __init__(self, name: Any, flags: list[int]) -> None:
        self.path = name.filename() if isinstance(name, apsw.URIFilename) else name
        self.recorded = isinstance(self.path, str) and powercut.watched(self.path)
        created = self.recorded and not os.path.exists(self.path)
        super().__init__("", name, flags)
        # Writes since the last sync, in the order made (later ones win where they overlap).
        self.pending: list[tuple[int, bytes]] = []
        self.dirsync = created and bool(flags[0] & _DIRSYNC_TYPES)
        self.write_kind = "db-write" if flags[0] & apsw.SQLITE_OPEN_MAIN_DB else "write"
        if created:
            powercut.file_created(self.path)

    def xWrite(self, data: bytes, offset: int) -> None:
        if self.recorded:
            powercut.operation(self.write_kind)
            self.pending.append((offset, bytes(data)))
        super().xWrite(data, offset)

    def xTruncate(self, size: int) -> None:
        if self.recorded:
            powercut.operation("truncate")
        super().xTruncate(size)

    def xSync(self, flags: int) -> None:
        super().xSync(flags)
        if not self.recorded:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            powercut.file_synced(fd, self.pending)
        finally:
            os.close(fd)
        self.pending = []
        if self.dirsync:
            self.dirsync = False
            powercut.operation("dir-sync")
            powercut.dir_entries_durable(os.path.dirname(self.path))


class RecordingVFS(apsw.VFS):
    def __init__(self) -> None:
        super().__init__(NAME, "")

    def xOpen(self, name: Any, flags: list[int]) -> RecordingFile:
        return RecordingFile(name, flags)

    def xDelete(self, name: str, syncdir: bool) -> None:
        super().xDelete(name, syncdir)
        if syncdir and powercut.watched(name):
            powercut.operation("dir-sync")
            powercut.dir_entries_durable(os.path.dirname(name))


_registered: list[RecordingVFS] = []


def vfs_name() -> str | None:
    """The VFS every connection opens with: this one when the tier records, else the
    default (None)."""
    if not powercut.ENABLED:
        return None
    if not _registered:
        _registered.append(RecordingVFS())
    return NAME
