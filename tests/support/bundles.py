"""Backup bundles made without daemons: each database made by this build's migrations,
a key, and an honest manifest; `rebundle` edits one and makes the manifest match again
(as the review's rebundle.py did: only what is in the file differs)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

import apsw
import msgspec

from pair.assistant.db import high_water as assistant_marks
from pair.ctl.bundle import CUT, MANIFEST, BundleDatabase, BundleFile, Manifest
from pair.ctl.schema import migrations_of


def make_bundle(where: Path, name: str = "pair-backup-20261207T000000Z") -> Path:
    bundle = where / name
    bundle.mkdir(mode=0o700, parents=True)
    for daemon in ("gateway", "assistant"):
        with contextlib.closing(apsw.Connection(str(bundle / f"{daemon}.db"))) as db:
            for migration in migrations_of(daemon):
                db.execute(migration)
            db.execute(f"PRAGMA user_version = {len(migrations_of(daemon))}")
    (bundle / "gateway.key").write_bytes(secrets.token_bytes(32))
    write_manifest(bundle)
    return bundle


def write_manifest(bundle: Path) -> None:
    from pair.gateway.db import high_water as gateway_marks

    databases = {}
    for daemon, marks in (("gateway", gateway_marks), ("assistant", assistant_marks)):
        with contextlib.closing(apsw.Connection(str(bundle / f"{daemon}.db"))) as db:
            row: Any = db.execute("PRAGMA user_version").fetchall()[0]
            version = int(row[0])
            databases[daemon] = BundleDatabase(
                file=f"{daemon}.db", version="0.2.0", sqlite_version=apsw.sqlite_lib_version(),
                schema_version=version, taken_at=1000, high_water=marks(db),
            )  # fmt: skip
    files = []
    for name in ("gateway.db", "gateway.key", "assistant.db"):
        data = (bundle / name).read_bytes()
        files.append(
            BundleFile(name=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        )
    manifest = Manifest(
        format="pair-backup/1", product="pair", version="0.2.0", created_at=1000, cut=CUT,
        databases=databases, files=files,
    )  # fmt: skip
    (bundle / MANIFEST).write_bytes(msgspec.json.encode(manifest))


def rebundle(bundle: Path, daemon: str, *statements: str) -> Path:
    with contextlib.closing(apsw.Connection(str(bundle / f"{daemon}.db"))) as db:
        for statement in statements:
            db.execute(statement)
    write_manifest(bundle)
    return bundle


def state_files(state: Path) -> dict[str, bytes]:
    """Every regular file under `state` by its relative path, with its bytes."""
    return {
        str(path.relative_to(state)): path.read_bytes()
        for path in sorted(state.rglob("*"))
        if path.is_file() and not path.is_symlink() and path.name != ".lock"
    }


def fill_state(state: Path) -> dict[str, bytes]:
    """A state directory as a pair leaves it (files the restore must keep whole)."""
    state.mkdir(mode=0o700, exist_ok=True)
    for name in ("gateway.db", "gateway.key", "assistant.db", "gateway.db-wal"):
        (state / name).write_bytes(os.urandom(64))
    return state_files(state)
