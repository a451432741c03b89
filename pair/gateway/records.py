"""The gateway's records as they go on the wire (camelCase), built from rows, and their ids
and page cursors."""

from __future__ import annotations

import base64
import binascii
import os
import time
from typing import Any

from msgspec import Struct

from pair.gateway.errors import NotFound
from pair.protocol.errors import InvalidParams

CONTACT_COLUMNS = "id, display_name, role, principal_id, created_at, updated_at"
CHANNEL_COLUMNS = (
    "id, contact_id, type, address, is_primary, external_user_id, external_chat_id, status,"
    " policy, verified_at, verified_via, invite_id, revoked_reason, blocked_reason,"
    " last_seen_at, interaction_count, last_interaction, created_at, updated_at"
)
INVITE_COLUMNS = (
    "id, source_channel, contact_id, max_uses, use_count, status, expires_at, note,"
    " redeemed_at, created_at, updated_at"
)


class Contact(Struct, rename="camel", gc=False):
    id: str
    display_name: str
    role: str
    principal_id: str | None
    created_at: int
    updated_at: int


class Channel(Struct, rename="camel", gc=False):
    id: str
    contact_id: str
    type: str
    address: str
    is_primary: bool
    external_user_id: str | None
    external_chat_id: str | None
    status: str
    policy: str
    verified_at: int | None
    verified_via: str | None
    invite_id: str | None
    revoked_reason: str | None
    blocked_reason: str | None
    last_seen_at: int | None
    interaction_count: int
    last_interaction: int | None
    created_at: int
    updated_at: int | None


class Invite(Struct, rename="camel", gc=False):
    """An invite as callers see it: never its code or code hash."""

    id: str
    source_channel: str
    contact_id: str
    max_uses: int
    use_count: int
    status: str
    expires_at: int
    note: str | None
    redeemed_at: int | None
    created_at: int
    updated_at: int


def contact_of(row: tuple[Any, ...]) -> Contact:
    return Contact(*row)


def channel_of(row: tuple[Any, ...]) -> Channel:
    values = list(row)
    values[4] = bool(values[4])
    return Channel(*values)


def invite_of(row: tuple[Any, ...], now: int) -> Invite:
    invite = Invite(*row)
    if invite.status == "active" and invite.expires_at <= now:
        invite.status = "expired"
    return invite


def new_id(prefix: str) -> str:
    """`prefix_` and 32 hex digits: milliseconds since the epoch (12), then 80 random bits.

    Time first (as in UUIDv7), so each new row lands at the right edge of its
    primary-key index: random ids dirtied one more index page per insert, and
    a group commit wrote about 250 pages to the WAL for 25 redemptions.
    """
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def not_found(what: str, record_id: str) -> NotFound:
    return NotFound(f"no {what} with id {record_id!r}")


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> str:
    """The id a page starts after; '' for the first page."""
    if not cursor:
        return ""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidParams("cursor is not one this server returned", path="$.cursor") from exc
