"""A backup bundle of the pair: both databases, the gateway's key, and a manifest.

    DIR/pair-backup-<UTC time>[.N]/   a bundle; `manifest.json` is written last
        manifest.json
        gateway.db  gateway.key  assistant.db
    DIR/.pair-backup-<UTC time>-<random>.partial/   one being written, or cut short
    DIR/.pair-backup-<UTC time>-<random>.failed/    one that failed its checks

Only a bundle that passed every check gets a `pair-backup-` name. Every file of
it is written through `pair.runtime.files` relative to the directory's
descriptor: pairctl often runs as root, in a directory others may have touched.

The cut: the gateway's snapshot is taken first, then the assistant's. An event
the gateway's snapshot counts as delivered (its outbox sequence number is at or
below `outboxSeq` and it is no longer in the outbox) was stored by the assistant
before the gateway's snapshot, so it is in the assistant's. Events still in the
gateway's outbox may be in the assistant's snapshot too; after a restore the
gateway delivers them again and the assistant stores each event id once.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec
from msgspec import Struct

from pair.protocol.backup import BackupResult
from pair.runtime.files import (
    Dir,
    UnsafePath,
    copy_hashed,
    owner_name,
    replace_atomically,
)
from pair.runtime.restore import ALL_FILES, FILES

MANIFEST = "manifest.json"
MANIFEST_LIMIT = 1 << 20
PREFIX = "pair-backup-"
PARTIAL = ".partial"
FAILED = ".failed"
CUT = "gateway, then assistant"
SNAPSHOT_DIR = "backup"
# A snapshot file's name in the daemon's backup/: `<stamp>-<random>.<name>`.
SNAPSHOT_NAME = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}\.(?P<name>[a-z]+\.(?:db|key))")


class BundleFile(Struct, rename="camel", kw_only=True):
    name: str
    bytes: int
    sha256: str


class BundleDatabase(Struct, rename="camel", kw_only=True):
    file: str
    version: str
    sqlite_version: str
    schema_version: int
    taken_at: int
    high_water: dict[str, int]


class Manifest(Struct, rename="camel", kw_only=True):
    format: Literal["pair-backup/1"]
    product: Literal["pair"]
    version: str
    created_at: int
    cut: str
    databases: dict[str, BundleDatabase]
    files: list[BundleFile]


class BundleError(Exception):
    """A bundle that cannot be written, read or restored; the message says why."""


def stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def staging_dir(into: Dir) -> Dir:
    """A new `.partial` directory in `into` (mode 0700: the key goes in it)."""
    name = f".{PREFIX}{stamp()}-{secrets.token_hex(4)}{PARTIAL}"
    into.subdir(name, create=True)
    return into.subdir(name)


def snapshot_of(answer: Any, daemon: str) -> BackupResult:
    """The daemon's `backup` answer, refused unless it names exactly its files."""
    try:
        snapshot = msgspec.convert(answer, BackupResult)
    except msgspec.ValidationError as exc:
        raise BundleError(f"the {daemon}'s backup answer cannot be read: {exc}") from exc
    names = [file.name for file in snapshot.files]
    if snapshot.daemon != daemon or sorted(names) != sorted(FILES[daemon]):
        raise BundleError(
            f"the {daemon}'s backup answer names {names!r} of {snapshot.daemon!r}, not the"
            f" {daemon}'s files {list(FILES[daemon])}: nothing of it was copied"
        )
    return snapshot


def open_snapshot_dir(snapshot: BackupResult, peer_uid: int, trusted: Collection[int]) -> Dir:
    """The one directory the daemon's snapshot files may be in: a `backup/` every
    directory above which is trusted, owned by the daemon that answered (its uid, from
    the socket), all the snapshot's files named in it."""
    parents = {str(Path(file.path).parent) for file in snapshot.files}
    if len(parents) != 1 or Path(parents.pop()).name != SNAPSHOT_DIR:
        paths = [file.path for file in snapshot.files]
        raise BundleError(f"the {snapshot.daemon}'s snapshot is not in one backup/: {paths!r}")
    directory = Dir.open(Path(snapshot.files[0].path).parent, trusted=trusted)
    if directory.stat().st_uid != peer_uid:
        owner = owner_name(directory.stat().st_uid)
        directory.close()
        raise UnsafePath(
            f"refusing {directory.path}: it belongs to {owner}, not to the {snapshot.daemon}"
            f" that answered ({owner_name(peer_uid)})"
        )
    return directory


def collect(snapshot: BackupResult, source: Dir, staging: Dir, peer_uid: int) -> list[BundleFile]:
    """Copy a daemon's snapshot files from its `source` backup/ into `staging`, each read
    once and checked against the answer's size and sha256, then remove them there."""
    collected = []
    for file in snapshot.files:
        basename = Path(file.path).name
        named = SNAPSHOT_NAME.fullmatch(basename)
        if named is None or named["name"] != file.name:
            raise BundleError(f"{file.path!r} is not a snapshot file of {file.name!r}")
        with source.open_regular(basename, owner=peer_uid) as reader:
            if os.fstat(reader.fileno()).st_size != file.bytes:
                raise BundleError(
                    f"{source.path / basename} is not the {file.bytes} bytes answered"
                )
            with staging.create(file.name) as out:
                size, digest = copy_hashed(reader, out, limit=file.bytes)
        if digest != file.sha256 or size != file.bytes:
            raise BundleError(f"{source.path / basename} changed while it was copied")
        collected.append(BundleFile(name=file.name, bytes=size, sha256=digest))
        source.unlink(basename, missing_ok=True)
    source.sync()
    return collected


def write_manifest(
    staging: Dir, snapshots: dict[str, BackupResult], files: list[BundleFile]
) -> None:
    manifest = Manifest(
        format="pair-backup/1",
        product="pair",
        version=snapshots["gateway"].version,
        created_at=int(time.time() * 1000),
        cut=CUT,
        databases={
            daemon: BundleDatabase(
                file=FILES[daemon][0],
                version=answer.version,
                sqlite_version=answer.sqlite_version,
                schema_version=answer.schema_version,
                taken_at=answer.taken_at,
                high_water=answer.high_water,
            )
            for daemon, answer in snapshots.items()
        },
        files=files,
    )
    encoded = msgspec.json.format(msgspec.json.encode(manifest)) + b"\n"
    replace_atomically(staging, MANIFEST, encoded)


def seal(into: Dir, staging: Dir, *, good: bool) -> Path:
    """Name the staging directory: `pair-backup-<stamp>` (`.1`, `.2`, ... when taken) if
    `good`, else `.pair-backup-<...>.failed`; the directory entry fsynced."""
    partial = staging.path.name
    if not good:
        failed = partial.removesuffix(PARTIAL) + FAILED
        into.rename(partial, failed)
        into.sync()
        return into.path / failed
    base = partial[1:].removesuffix(PARTIAL).rsplit("-", 1)[0]
    for attempt in range(1000):
        final = base if attempt == 0 else f"{base}.{attempt}"
        # `into` is writable by no one else (checked when it was opened).
        if into.lstat(final) is None:
            into.rename(partial, final)
            into.sync()
            return into.path / final
    raise BundleError(f"cannot name a new bundle in {into.path}")


def read_manifest(bundle: Dir) -> Manifest:
    """The manifest, refused unless it names exactly the format's files."""
    try:
        raw = bundle.read_small(MANIFEST, MANIFEST_LIMIT)
        manifest = msgspec.json.decode(raw, type=Manifest)
    except FileNotFoundError:
        raise BundleError(f"{bundle.path / MANIFEST} is missing") from None
    except (OSError, UnsafePath, msgspec.DecodeError) as exc:
        raise BundleError(f"{bundle.path / MANIFEST} is unreadable: {_reason(exc)}") from exc
    listed = [file.name for file in manifest.files]
    named = {daemon: database.file for daemon, database in manifest.databases.items()}
    wanted = {daemon: names[0] for daemon, names in FILES.items()}
    if sorted(listed) != sorted(ALL_FILES) or named != wanted:
        raise BundleError(
            f"{bundle.path / MANIFEST} lists files {listed!r} and databases {named!r};"
            f" a bundle holds exactly {list(ALL_FILES)} and databases {wanted!r}"
        )
    return manifest


def bundles(into: Dir) -> Iterator[tuple[Path, str]]:
    """The bundles in `into`, oldest first, each with what it is: `bundle` (named as
    one, its manifest readable and every file of the manifest's size), `DAMAGED: why`,
    `UNREADABLE: why` (by this user), `INCOMPLETE` (cut short) or `FAILED` (failed its
    checks when taken)."""
    for name in into.names():
        if not name.lstrip(".").startswith(PREFIX):
            continue
        found = into.lstat(name)
        if found is None or not stat.S_ISDIR(found.st_mode):
            continue
        if name.endswith(PARTIAL):
            yield into.path / name, "INCOMPLETE: cut short, not a bundle"
        elif name.endswith(FAILED):
            yield into.path / name, "FAILED: failed its checks when it was taken"
        elif name.startswith(PREFIX):
            yield into.path / name, _listed_state(into, name)


def _listed_state(into: Dir, name: str) -> str:
    try:
        with into.subdir(name) as bundle:
            manifest = read_manifest(bundle)
            for file in manifest.files:
                found = bundle.lstat(file.name)
                if found is None or found.st_size != file.bytes:
                    return f"DAMAGED: {file.name} is not the manifest's {file.bytes} bytes"
    except (OSError, UnsafePath) as exc:
        return f"UNREADABLE: {_reason(exc)}"
    except BundleError as exc:
        return f"DAMAGED: {exc}"
    return f"bundle of pair {manifest.version}, taken {when(manifest.created_at)}"


def when(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
