"""One-time migrations that need the assistant, run in order once it is reachable.

Each is recorded in `one_time_migrations` only when it has completed, is safe
to run again after a crash at any point, and a failure blocks the ones after
it (retried with backoff, visible in `health`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from pair.gateway.codes import LEGACY_PREFIX
from pair.gateway.db import Database, transaction
from pair.gateway.link import AssistantLink
from pair.gateway.records import new_id
from pair.protocol.errors import IpcError, IpcHandlerError
from pair.runtime.failpoints import failpoint
from pair.runtime.sqlite import Conn, now_ms

log = logging.getLogger("gateway.one_time_migrations")

RETRY_START = 0.5
RETRY_CAP = 30.0
DELETE_CHUNK = 500

Migration = Callable[[Database, AssistantLink], Awaitable[None]]


class MigrationError(Exception):
    """A migration could not complete this time; it is retried."""


@dataclass
class MigrationState:
    pending: list[str] = field(default_factory=list)
    failed: str | None = None
    last_error: str | None = None


def _done(conn: Conn) -> set[str]:
    return {row[0] for row in conn.execute("SELECT key FROM one_time_migrations")}


def _record(conn: Conn, key: str) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO one_time_migrations (key, ran_at) VALUES (?, ?)", (key, now_ms())
    )


class MigrationRunner:
    def __init__(self, db: Database, link: AssistantLink) -> None:
        self.db = db
        self.link = link
        self.migrations: list[tuple[str, Migration]] = [
            ("import_legacy_invites", import_legacy_invites),
        ]
        self.state = MigrationState()

    async def load(self) -> None:
        done = await self.db.run(_done)
        self.state.pending = [key for key, _ in self.migrations if key not in done]

    async def run(self) -> None:
        """Run the pending migrations in order; a failing one is retried and blocks the rest."""
        for key, migration in self.migrations:
            if key not in self.state.pending:
                continue
            await self._run_until_done(key, migration)
            self.state.pending.remove(key)
            log.info("one-time migration %s done", key)

    async def _run_until_done(self, key: str, migration: Migration) -> None:
        delay = RETRY_START
        while True:
            try:
                await migration(self.db, self.link)
                await self.db.run(functools.partial(_record, key=key))
            except Exception as exc:
                # Whatever the cause, this migration blocks the later ones and is
                # retried; the gateway keeps serving.
                self.state.failed, self.state.last_error = key, str(exc)
                log.warning(
                    "one-time migration %s failed, retrying in %.1fs: %s",
                    key,
                    delay,
                    exc,
                    exc_info=not isinstance(exc, IpcError | MigrationError),
                )
            else:
                self.state.failed = None
                return
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRY_CAP)


LEGACY_SELECT = (
    "SELECT id, source_channel, coalesce(invite_code_hash, voice_code_hash) AS code_hash,"
    " note, max_uses, use_count, expires_at, contact_id, friend_name, created_at"
    " FROM assistant_ingress_invites"
    " WHERE status = 'active' AND expires_at > ? AND use_count < max_uses"
    " AND coalesce(invite_code_hash, voice_code_hash) IS NOT NULL ORDER BY id"
)


async def import_legacy_invites(db: Database, link: AssistantLink) -> None:
    """Copy the assistant's active legacy invites here, then delete exactly those there.

    Safe at any crash point: the import keeps the legacy ids (a re-run
    inserts nothing twice), and the delete carries an idempotency key derived
    from the ids, so a retried delete after a lost answer is applied once.
    """
    try:
        found = await link.assistant_db_query(LEGACY_SELECT, [now_ms()])
    except IpcHandlerError as exc:
        if "no such table" in exc.message:
            return
        raise
    rows: list[dict[str, Any]] = found["rows"]
    if not rows:
        return
    imported = await db.run(functools.partial(_import_rows, rows=rows))
    log.info("imported %d legacy invite(s) from the assistant", imported)
    failpoint("after_legacy_import")
    ids = [row["id"] for row in rows]
    for start in range(0, len(ids), DELETE_CHUNK):
        await _delete_legacy(link, ids[start : start + DELETE_CHUNK])


def _import_rows(conn: Conn, rows: list[dict[str, Any]]) -> int:
    now = now_ms()
    imported = 0
    with transaction(conn):
        for row in rows:
            contact_id = _contact_for(conn, row, now)
            imported += conn.changes_of(
                "INSERT OR IGNORE INTO ingress_invites (id, source_channel, invite_code_hash, note,"
                " max_uses, use_count, expires_at, status, contact_id, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, ?)",
                (
                    row["id"], row["source_channel"], LEGACY_PREFIX + row["code_hash"].lower(),
                    row["note"], row["max_uses"], row["use_count"], row["expires_at"],
                    contact_id, row["created_at"], now,
                ),
            )  # fmt: skip
    return imported


def _contact_for(conn: Conn, row: dict[str, Any], now: int) -> str:
    """The legacy invite's contact here; created from its friend_name when missing."""
    contact_id = row["contact_id"] or new_id("ct")
    if conn.execute("SELECT 1 FROM contacts WHERE id = ?", (contact_id,)):
        return str(contact_id)
    name = row["friend_name"] or f"Invitee of {row['id']}"
    conn.execute(
        "INSERT INTO contacts (id, display_name, role, created_at, updated_at)"
        " VALUES (?, ?, 'contact', ?, ?)",
        (contact_id, name, now, now),
    )
    return str(contact_id)


async def _delete_legacy(link: AssistantLink, ids: list[str]) -> None:
    key = "import_legacy_invites:" + hashlib.sha256("\n".join(ids).encode()).hexdigest()
    steps = [
        {
            "sql": "DELETE FROM assistant_ingress_invites WHERE id = ?",
            "bind": [invite_id],
            "requireChanges": 1,
        }
        for invite_id in ids
    ]
    result = await link.assistant_db_transaction(steps, idempotency_key=key)
    if not result["ok"]:
        # A row vanished since the import: nothing was deleted; the next run
        # imports and deletes the rows that are still there.
        step = result["failedStep"]
        raise MigrationError(f"legacy invite {ids[step]} was gone before its delete; will re-read")
