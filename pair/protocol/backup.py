"""The `backup` method's answer, read by the daemon that writes it and by pairctl, which
takes nothing else from it (pair/ctl/bundle.py checks every name and path in it)."""

from __future__ import annotations

from msgspec import Struct


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
