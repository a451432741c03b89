"""The `backup` method's answer and errors. The answer is read by the daemon that writes
it and by pairctl, which takes nothing else from it (pair/ctl/bundle.py checks every
name and path in it)."""

from __future__ import annotations

from msgspec import Struct

from pair.protocol.errors import DomainError


class SnapshotFile(Struct, rename="camel", kw_only=True):
    """One file of a daemon's snapshot, to be copied by its path."""

    name: str
    path: str
    bytes: int
    sha256: str


class BackupResult(Struct, rename="camel", kw_only=True):
    """What the `backup` method answers."""

    daemon: str
    version: str
    sqlite_version: str
    schema_version: int
    taken_at: int
    high_water: dict[str, int]
    files: list[SnapshotFile]


class BackupBusy(DomainError):
    """Raised when a backup is asked for while this daemon is taking one."""

    default_status = 409
    default_error_code = "BACKUP_IN_PROGRESS"
    default_retryable = True


class BackupNoSpace(DomainError):
    """Raised when the snapshot did not fit in the state directory's file system."""

    default_status = 507
    default_error_code = "BACKUP_NO_SPACE"
    default_retryable = True


class BackupFailed(DomainError):
    """Raised when the snapshot failed for any other reason (its message says which)."""

    default_status = 500
    default_error_code = "BACKUP_FAILED"
