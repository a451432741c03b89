"""A backup bundle of the pair: both databases, the gateway's key, and a manifest.

    DIR/pair-backup-<UTC time>/   a bundle; `manifest.json` is written last
        manifest.json
        gateway.db  gateway.key  assistant.db
    DIR/.pair-backup-<UTC time>.partial/   one being written, or cut short: never a bundle

The cut: the gateway's snapshot is taken first, then the assistant's. An event
the gateway's snapshot counts as delivered (its outbox sequence number is at or
below `outboxSeq` and it is no longer in the outbox) was stored by the assistant
before the gateway's snapshot, so it is in the assistant's. Events still in the
gateway's outbox may be in the assistant's snapshot too; after a restore the
gateway delivers them again and the assistant stores each event id once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
from msgspec import Struct

from pair.runtime.paths import fsync_dir, kept_aside

MANIFEST = "manifest.json"
PREFIX = "pair-backup-"
PARTIAL = ".partial"
CUT = "gateway, then assistant"
# What each daemon's snapshot holds: its database, then its other files.
FILES = {"gateway": ("gateway.db", "gateway.key"), "assistant": ("assistant.db",)}


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


def staging_dir(into: Path) -> Path:
    """A new `.partial` directory in `into` (made, mode 0700: the key goes in it)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for attempt in range(100):
        name = f".{PREFIX}{stamp}{f'.{attempt}' if attempt else ''}{PARTIAL}"
        with contextlib.suppress(FileExistsError):
            path = into / name
            path.mkdir(mode=0o700)
            return path
    raise BundleError(f"cannot name a new bundle in {into}")


def collect(snapshot: dict[str, Any], staging: Path) -> list[BundleFile]:
    """Copy a daemon's snapshot files (its `backup` answer) into `staging`, checking each
    one's sha256 on the way, then remove them from the daemon's state directory."""
    collected = []
    for file in snapshot["files"]:
        target = staging / file["name"]
        digest = hashlib.sha256()
        with open(file["path"], "rb") as source, open(target, "xb", opener=_private) as out:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        if digest.hexdigest() != file["sha256"] or size != file["bytes"]:
            raise BundleError(f"{file['path']} changed while it was copied")
        collected.append(BundleFile(name=file["name"], bytes=size, sha256=file["sha256"]))
        # The daemon removes it itself after an hour when this user may not.
        with contextlib.suppress(OSError):
            os.unlink(file["path"])
    return collected


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def seal(staging: Path, snapshots: dict[str, dict[str, Any]], files: list[BundleFile]) -> Path:
    """Write the manifest, then give the bundle its name: a directory named
    `pair-backup-*` holds a whole bundle."""
    manifest = Manifest(
        format="pair-backup/1",
        product="pair",
        version=snapshots["gateway"]["version"],
        created_at=int(time.time() * 1000),
        cut=CUT,
        databases={
            daemon: BundleDatabase(
                file=FILES[daemon][0],
                version=answer["version"],
                sqlite_version=answer["sqliteVersion"],
                schema_version=answer["schemaVersion"],
                taken_at=answer["takenAt"],
                high_water=answer["highWater"],
            )
            for daemon, answer in snapshots.items()
        },
        files=files,
    )
    partial = staging / (MANIFEST + PARTIAL)
    with open(partial, "wb", opener=_private) as out:
        out.write(msgspec.json.format(msgspec.json.encode(manifest)) + b"\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, staging / MANIFEST)
    fsync_dir(staging)
    final = staging.with_name(staging.name[1 : -len(PARTIAL)])
    os.rename(staging, final)
    fsync_dir(final.parent)
    return final


def bundles(into: Path) -> Iterator[tuple[Path, bool]]:
    """The bundles in `into`, oldest first, each with whether it is whole (named as one,
    with a manifest); `.partial` directories are listed as not whole."""
    for path in sorted(into.iterdir()):
        if path.is_dir() and path.name.lstrip(".").startswith(PREFIX):
            whole = path.name.startswith(PREFIX) and (path / MANIFEST).is_file()
            yield path, whole


@dataclass(slots=True)
class Check:
    ok: bool
    line: str


def verify(bundle: Path) -> tuple[Manifest | None, list[Check]]:
    """Every check of a bundle, each a line to print; the manifest when it could be read."""
    checks: list[Check] = []
    if bundle.name.endswith(PARTIAL) or not bundle.name.startswith(PREFIX):
        checks.append(Check(False, f"{bundle.name}: not a finished bundle (cut short?)"))
    try:
        manifest = msgspec.json.decode((bundle / MANIFEST).read_bytes(), type=Manifest)
    except FileNotFoundError:
        checks.append(Check(False, f"manifest: {bundle / MANIFEST} is missing"))
        return None, checks
    except (OSError, msgspec.DecodeError) as exc:
        checks.append(Check(False, f"manifest: unreadable ({exc})"))
        return None, checks
    taken = _when(manifest.created_at)
    checks.append(Check(True, f"manifest: {manifest.format} of pair {manifest.version}, {taken}"))
    expected = {name for names in FILES.values() for name in names}
    listed = {file.name for file in manifest.files}
    if listed != expected or set(manifest.databases) != set(FILES):
        checks.append(
            Check(False, f"manifest: lists {sorted(listed)}, expected {sorted(expected)}")
        )
        return manifest, checks
    for file in manifest.files:
        checks.append(_check_file(bundle / file.name, file))
    for daemon, database in manifest.databases.items():
        checks.extend(_check_database(bundle / database.file, daemon, database))
    gateway, assistant = manifest.databases["gateway"], manifest.databases["assistant"]
    in_order = gateway.taken_at <= assistant.taken_at
    cut = f"cut: gateway's snapshot at {_when(gateway.taken_at)}, then assistant's at"
    cut += f" {_when(assistant.taken_at)}" + ("" if in_order else ": out of order")
    checks.append(Check(in_order, cut))
    return manifest, checks


def _check_file(path: Path, file: BundleFile) -> Check:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as source:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
            size = source.tell()
    except OSError as exc:
        return Check(False, f"{file.name}: cannot be read ({exc.strerror or exc})")
    found = digest.hexdigest()
    if size != file.bytes or found != file.sha256:
        wrong = f"{file.name}: {size} bytes, sha256 {found[:12]}..., but the manifest says"
        return Check(False, f"{wrong} {file.bytes} bytes, {file.sha256[:12]}...")
    return Check(True, f"{file.name}: {size} bytes, sha256 {file.sha256[:12]}... matches")


def _check_database(path: Path, daemon: str, database: BundleDatabase) -> list[Check]:
    import apsw  # only the commands that open a database pay for it

    from pair.assistant.db import MIGRATIONS as ASSISTANT
    from pair.assistant.db import high_water as assistant_marks
    from pair.gateway.db import MIGRATIONS as GATEWAY
    from pair.gateway.db import high_water as gateway_marks
    from pair.runtime.backup import schema_version_of

    newest = len(GATEWAY if daemon == "gateway" else ASSISTANT)
    marks = gateway_marks if daemon == "gateway" else assistant_marks
    name = database.file
    try:
        # immutable: nothing is written beside a bundle's file, not even a -shm.
        db = apsw.Connection(
            f"file:{path}?immutable=1", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
        )
    except apsw.Error as exc:
        return [Check(False, f"{name}: cannot be opened ({exc})")]
    checks = []
    try:
        version = schema_version_of(db)
        if version > newest:
            newer = f"{name}: schema version {version} is newer than this build of pair opens"
            later = f"({newest}); restore it with pair {database.version} or later"
            return [Check(False, f"{newer} {later}")]
        problems = [str(row[0]) for row in db.execute("PRAGMA integrity_check(10)")]
        intact = problems == ["ok"]
        integrity = "ok" if intact else "; ".join(problems)
        checks.append(Check(intact, f"{name}: integrity_check {integrity}"))
        said = database.schema_version
        schema = f"{name}: schema version {version} (this build opens up to {newest}"
        checks.append(Check(version == said, f"{schema}; the manifest says {said})"))
        found = marks(db)
        same = found == database.high_water
        differs = f"; the manifest says {_marks(database.high_water)}"
        checks.append(Check(same, f"{name}: {_marks(found)}{'' if same else differs}"))
    except apsw.Error as exc:
        checks.append(Check(False, f"{name}: unreadable ({exc})"))
    finally:
        db.close()
    return checks


def _marks(marks: dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in marks.items())


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def restore(bundle: Path, state: Path) -> list[str]:
    """Put the bundle's files in place of those in `state`, each by an atomic rename; the
    files they replace (with their -wal and -shm) are kept in `<name>.db.pre-restore/`
    until the daemon opens the restored database. Lines saying what was done."""
    for database in ("gateway.db", "assistant.db"):
        aside = kept_aside(state / database)
        if aside.exists():
            raise BundleError(
                f"{aside} holds the files an earlier restore replaced, and its daemon has not"
                " started since: start the pair once, or move that directory away"
            )
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = state.stat()
    done = []
    for names in FILES.values():
        database = names[0]
        aside = kept_aside(state / database)
        incoming = []
        for name in names:
            restoring = state / (name + ".restoring")
            shutil.copyfile(bundle / name, restoring)
            with open(restoring, "rb") as file:
                os.fsync(file.fileno())
            os.chmod(restoring, 0o600)
            if os.geteuid() == 0:
                os.chown(restoring, owner.st_uid, owner.st_gid)
            incoming.append((restoring, state / name))
        kept = []
        for name in [database + "-wal", database + "-shm", *names]:
            current = state / name
            if current.exists():
                if not aside.exists():
                    aside.mkdir(mode=0o700)
                    # The daemon removes it once it has opened the restored file.
                    if os.geteuid() == 0:
                        os.chown(aside, owner.st_uid, owner.st_gid)
                os.rename(current, aside / name)
                kept.append(name)
        for restoring, final in incoming:
            os.rename(restoring, final)
        fsync_dir(state)
        line = f"restored {', '.join(names)} into {state}"
        if kept:
            line += f"; kept the replaced {', '.join(kept)} in {aside}"
        done.append(line)
    return done
