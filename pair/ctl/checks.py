"""What `backup --verify` and `restore` check of a bundle, each check a line to print.

A file is read once, through a descriptor that follows no link and opens only
a regular file: its size and sha256 against the manifest's. A database is
checked where it will be used (restore checks its own private copy, never
the bundle's file again): its size is its header's pages, its `user_version`
one this build knows, its schema what this build's migrations make at that
version (no table, column or index missing or changed, no trigger or view of
anyone else's on the daemon's tables), `integrity_check` ok, and its high-water
marks the manifest's.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from pair.ctl.bundle import BundleDatabase, BundleError, BundleFile, Manifest, read_manifest, when
from pair.runtime.files import Dir, UnsafePath, copy_hashed, private_dir

# The header fields that say how big the file should be (sqlite.org/fileformat.html).
HEADER = struct.Struct(">16sH6xII60xI")
HEADER_MAGIC = b"SQLite format 3\x00"
KEY_BYTES = 32


def copied_name(name: str) -> str:
    """A bundle file's private copy: named apart, so nothing mistakes one for the other."""
    return f"checked-{name}"


@dataclass(slots=True)
class Check:
    ok: bool
    line: str


def verify(path: Path, *, named: bool = True) -> tuple[Manifest | None, list[Check]]:
    """Every check of the bundle at `path` (also of its name, when it should be `named`
    as a bundle); the manifest when it could be read. Each file is read once, into a
    private copy, and the databases are checked there: never where another user could
    swap them between the check and SQLite's open by name."""
    checks: list[Check] = []
    if named and not path.name.startswith("pair-backup-"):
        checks.append(Check(False, f"{path.name}: not a finished bundle (cut short or failed)"))
    try:
        with Dir.open(path) as bundle, private_dir() as private:
            manifest = read_manifest(bundle)
            checks.append(_manifest_line(manifest))
            checks += checked_copies(bundle, manifest, private)
    except (OSError, UnsafePath, BundleError) as exc:
        checks.append(Check(False, f"{path}: {_reason(exc)}"))
        return None, checks
    return manifest, checks


def _manifest_line(manifest: Manifest) -> Check:
    taken = when(manifest.created_at)
    return Check(True, f"manifest: {manifest.format} of pair {manifest.version}, {taken}")


def checked_copies(bundle: Dir, manifest: Manifest, into: Dir) -> list[Check]:
    """Copy each file of `bundle` into `into` (read once, hashed as copied, never past
    the manifest's size) and check the copies: sizes and sha256, the key's length, the
    databases, the cut."""
    checks = [_copied(bundle, file, into) for file in manifest.files]
    copied = {file.name for file, check in zip(manifest.files, checks, strict=True) if check.ok}
    key = next(file for file in manifest.files if file.name == "gateway.key")
    if key.bytes != KEY_BYTES:
        checks.append(Check(False, f"gateway.key: {key.bytes} bytes; a key is {KEY_BYTES}"))
    for daemon, database in manifest.databases.items():
        if database.file in copied:
            checks += check_database(into.path / copied_name(database.file), daemon, database)
    checks.append(cut_check(manifest))
    return checks


def _copied(bundle: Dir, file: BundleFile, into: Dir) -> Check:
    try:
        with bundle.open_regular(file.name) as source:
            size = os.fstat(source.fileno()).st_size
            if size != file.bytes:
                return Check(
                    False, f"{file.name}: {size} bytes, but the manifest says {file.bytes}"
                )
            problem = size_problem_of(source) if file.name.endswith(".db") else None
            if problem is not None:
                return Check(False, f"{file.name}: {problem}")
            with into.create(copied_name(file.name)) as out:
                size, digest = copy_hashed(source, out, limit=file.bytes)
    except (OSError, UnsafePath) as exc:
        return Check(False, f"{file.name}: cannot be read ({_reason(exc)})")
    return matches(file, size, digest)


def matches(file: BundleFile, size: int, found: str) -> Check:
    if size != file.bytes or found != file.sha256:
        wrong = f"{file.name}: {size} bytes, sha256 {found[:12]}..., but the manifest says"
        return Check(False, f"{wrong} {file.bytes} bytes, {file.sha256[:12]}...")
    return Check(True, f"{file.name}: {size} bytes, sha256 {file.sha256[:12]}... matches")


def cut_check(manifest: Manifest) -> Check:
    gateway, assistant = manifest.databases["gateway"], manifest.databases["assistant"]
    in_order = gateway.taken_at <= assistant.taken_at
    cut = f"cut: gateway's snapshot at {when(gateway.taken_at)}, then assistant's at"
    cut += f" {when(assistant.taken_at)}" + ("" if in_order else ": out of order")
    return Check(in_order, cut)


def check_database(path: Path, daemon: str, database: BundleDatabase) -> list[Check]:
    """The checks of one private copy of a database (its size against its header was
    checked on the file it was copied from, whose bytes it holds)."""
    import apsw  # only the commands that open a database pay for it

    name = database.file
    try:
        # immutable: nothing is written beside the file, not even a -shm.
        db = apsw.Connection(
            f"file:{quote(str(path))}?immutable=1",
            flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI,
        )
    except apsw.Error as exc:
        return [Check(False, f"{name}: cannot be opened ({exc})")]
    try:
        return _database_checks(db, daemon, database)
    except apsw.Error as exc:
        return [Check(False, f"{name}: unreadable ({exc})")]
    finally:
        db.close()


def size_problem_of(file: BinaryIO) -> str | None:
    """Why the open file is not one whole SQLite database by its header (a sparse tail
    of zeros passes `integrity_check`), or None; its position is left as it was."""
    header = os.pread(file.fileno(), HEADER.size, 0)
    size = os.fstat(file.fileno()).st_size
    if len(header) < HEADER.size:
        return f"{size} bytes: too short for a SQLite database"
    magic, page_size, change, pages, valid_for = HEADER.unpack(header)
    if magic != HEADER_MAGIC:
        return "not a SQLite database (its header says otherwise)"
    page_size = 65536 if page_size == 1 else page_size
    if change == valid_for and size != page_size * pages:
        return f"{size} bytes, but its header says {pages} pages of {page_size} bytes"
    return None


def _database_checks(db: Any, daemon: str, database: BundleDatabase) -> list[Check]:
    from pair.ctl.schema import newest_version, schema_problems

    name, newest = database.file, newest_version(daemon)
    version = int(db.execute("PRAGMA user_version").fetchall()[0][0])
    if version > newest:
        newer = f"{name}: schema version {version} is newer than this build of pair opens"
        return [
            Check(False, f"{newer} ({newest}); restore it with pair {database.version} or later")
        ]
    if version < 0:
        return [Check(False, f"{name}: schema version {version} is not one pair ever made")]
    checks = []
    problems = [str(row[0]) for row in db.execute("PRAGMA integrity_check(10)")]
    intact = problems == ["ok"]
    checks.append(
        Check(intact, f"{name}: integrity_check {'ok' if intact else '; '.join(problems)}")
    )
    said = database.schema_version
    schema = f"{name}: schema version {version} (this build opens up to {newest}"
    checks.append(Check(version == said, f"{schema}; the manifest says {said})"))
    differences = schema_problems(db, daemon, version)
    found = "; ".join(differences) if differences else "as this build's migrations make it"
    checks.append(Check(not differences, f"{name}: schema {found}"))
    if not differences:
        checks.append(_marks_check(db, daemon, database))
    return checks


def _marks_check(db: Any, daemon: str, database: BundleDatabase) -> Check:
    from pair.assistant.db import high_water as assistant_marks
    from pair.gateway.db import high_water as gateway_marks

    found = (gateway_marks if daemon == "gateway" else assistant_marks)(db)
    same = found == database.high_water
    differs = f"; the manifest says {_marks(database.high_water)}"
    return Check(same, f"{database.file}: {_marks(found)}{'' if same else differs}")


def _marks(marks: dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in marks.items())


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
