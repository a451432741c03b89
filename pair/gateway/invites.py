"""Invites, local to gateway.db: create, redeem (one transaction), revoke, list, expire.

Every function runs on the database thread. Redemption is one write
transaction (alone, or its own part of a group commit): the guarded claim of
a use, the sender's channel and the `invite_redeemed` event are applied
together or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from msgspec import Struct

from pair.gateway.codes import CodeHasher, new_code
from pair.gateway.contacts import find_contact, sender_channels
from pair.gateway.db import CommitThenRaise, transaction
from pair.gateway.errors import (
    CodeSpaceExhausted,
    InviteExhausted,
    InviteExpired,
    InviteInvalid,
    InviteMissingIdentity,
    InviteRevoked,
    RateLimited,
)
from pair.gateway.outbox import queue_event
from pair.gateway.records import (
    INVITE_COLUMNS,
    Channel,
    Invite,
    decode_cursor,
    encode_cursor,
    invite_of,
    new_id,
    not_found,
)
from pair.protocol.errors import DomainError
from pair.runtime.sqlite import Conn, now_ms

CODE_ATTEMPTS = 50


@dataclass(frozen=True, slots=True)
class GuessLimits:
    """Failed redemptions allowed per sliding window; the README has the arithmetic."""

    per_sender: int = 5
    per_channel: int = 50
    window_ms: int = 15 * 60 * 1000


@dataclass(frozen=True, slots=True)
class Sender:
    channel: str
    external_user_id: str | None
    external_chat_id: str | None
    address: str | None = None
    display_name: str | None = None

    @property
    def scope(self) -> str:
        """Who the guess limits count: the channel's user id when there is one, else the
        chat id (SPEC.md section 4), so a new chat id is not a fresh budget."""
        if self.external_user_id:
            return f"sender:{self.channel}:user:{self.external_user_id}"
        return f"sender:{self.channel}:chat:{self.external_chat_id}"


class Redemption(Struct, rename="camel", gc=False):
    outcome: str
    invite_id: str
    contact_id: str
    channel_id: str


@dataclass(slots=True)
class _Candidate:
    """An invite whose code hash matched, as the redemption reads it."""

    id: str
    contact_id: str
    status: str
    expires_at: int
    use_count: int
    max_uses: int
    created_at: int

    def live(self, now: int) -> bool:
        return self.status == "active" and self.expires_at > now


def create_invite(
    conn: Conn,
    hasher: CodeHasher,
    contact_id: str,
    channel: str,
    max_uses: int,
    ttl_seconds: int,
    note: str | None,
) -> tuple[Invite, str]:
    """A new invite and its code; the code is returned here and never again."""
    now = now_ms()
    with transaction(conn):
        if find_contact(conn, contact_id) is None:
            raise not_found("contact", contact_id)
        code, code_hash = _unused_code(conn, hasher, channel, now)
        invite = Invite(
            new_id("inv"), channel, contact_id, max_uses, 0, "active",
            now + ttl_seconds * 1000, note, None, now, now,
        )  # fmt: skip
        conn.execute(
            "INSERT INTO ingress_invites (id, source_channel, invite_code_hash, note, max_uses,"
            " use_count, expires_at, status, contact_id, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, 0, ?, 'active', ?, ?, ?)",
            (
                invite.id,
                channel,
                code_hash,
                note,
                max_uses,
                invite.expires_at,
                contact_id,
                now,
                now,
            ),
        )
    return invite, code


def _unused_code(conn: Conn, hasher: CodeHasher, channel: str, now: int) -> tuple[str, str]:
    for _ in range(CODE_ATTEMPTS):
        code = new_code()
        candidates = hasher.candidates(code)
        taken = conn.execute(
            "SELECT 1 FROM ingress_invites WHERE invite_code_hash IN (?, ?)"
            " AND source_channel = ? AND status = 'active' AND expires_at > ?",
            (*candidates, channel, now),
        )
        if not taken:
            return code, candidates[0]
    raise CodeSpaceExhausted(
        f"could not find a code unused by the active invites of {channel}; retry later"
    )


def redeem(
    conn: Conn, hasher: CodeHasher, limits: GuessLimits, sender: Sender, code: str
) -> Redemption:
    """Redeem `code` for `sender`, or raise the outcome's RouteError (a failure is recorded)."""
    if not (sender.external_user_id or sender.external_chat_id):
        raise InviteMissingIdentity(
            "externalUserId or externalChatId is required to redeem an invite"
        )
    now = now_ms()
    scopes = (sender.scope, f"channel:{sender.channel}")
    with transaction(conn):
        sender_failures = _check_guess_limits(conn, limits, scopes, now)
        invite = _find_invite(conn, hasher, sender.channel, code, now)
        channels = sender_channels(
            conn, sender.channel, sender.external_user_id, sender.external_chat_id
        )
        refusal = _refusal(invite, channels, now)
        retried = _redeemed_by_sender(invite, channels)
        if refusal is not None and retried is not None and invite is not None:
            # This sender's own redemption, retried after a lost answer: the
            # same answer it would have had, and no failed attempt.
            return Redemption("already_member", invite.id, invite.contact_id, retried.id)
        if refusal is not None:
            _record_failure(conn, scopes, now)
            raise CommitThenRaise(refusal)
        assert invite is not None
        # The sender may be known under other contacts too; what matters here
        # is its channel with this invite's contact.
        known = next((c for c in channels if c.contact_id == invite.contact_id), None)
        if known is not None and known.status == "active":
            return Redemption("already_member", invite.id, invite.contact_id, known.id)
        if not _claim(conn, invite, sender, now):
            _record_failure(conn, scopes, now)
            raise CommitThenRaise(_exhausted())
        channel_id = _upsert_channel(conn, invite, known, sender, now)
        if sender_failures:
            # Older ones are swept with the expired invites.
            conn.execute("DELETE FROM redeem_failures WHERE scope = ?", (sender.scope,))
        queue_event(conn, "invite_redeemed", _event(invite, channel_id, sender, now))
    return Redemption("redeemed", invite.id, invite.contact_id, channel_id)


def _check_guess_limits(conn: Conn, limits: GuessLimits, scopes: tuple[str, str], now: int) -> int:
    """Raise RATE_LIMITED when a scope is over its limit; the sender's failures in the window."""
    since = now - limits.window_ms
    counts = []
    limited = (("sender", limits.per_sender), ("channel", limits.per_channel))
    for scope, (who, allowed) in zip(scopes, limited, strict=True):
        count = conn.execute(
            "SELECT count(*) FROM redeem_failures WHERE scope = ? AND at > ?", (scope, since)
        )[0][0]
        counts.append(count)
        if count < allowed:
            continue
        # The window slides: the limit lifts when enough of the oldest failures age out.
        (freed_at,) = conn.execute(
            "SELECT at FROM redeem_failures WHERE scope = ? AND at > ?"
            " ORDER BY at LIMIT 1 OFFSET ?",
            (scope, since, count - allowed),
        )[0]
        retry_after = max(1, freed_at + limits.window_ms - now)
        raise RateLimited(
            f"too many failed redemption attempts for this {who};"
            f" retry in {_wait_in_words(retry_after)}",
            data={"retryAfterMs": retry_after},
        )
    return int(counts[0])


def _wait_in_words(ms: int) -> str:
    """A wait as a person reads it, rounded up ("40 s", "15 min", "2 h 5 min"); the
    exact milliseconds are in `data.retryAfterMs`."""
    seconds = -(-ms // 1000)
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(-(-seconds // 60), 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _record_failure(conn: Conn, scopes: tuple[str, str], now: int) -> None:
    for scope in scopes:
        conn.execute("INSERT INTO redeem_failures (scope, at) VALUES (?, ?)", (scope, now))


def _find_invite(
    conn: Conn, hasher: CodeHasher, channel: str, code: str, now: int
) -> _Candidate | None:
    # The live invite with this code if there is one, else the newest dead one
    # (for the error); chosen here, not by ORDER BY, whose sorter costs more
    # than the lookup itself. The keyed form is looked up alone first: one
    # equality probe is a quarter of the cost of an IN over both forms.
    keyed, legacy = hasher.candidates(code)
    found = _invites_by_hash(conn, keyed, channel)
    if not any(invite.live(now) for invite in found):
        found += _invites_by_hash(conn, legacy, channel)
    if not found:
        return None
    return max(found, key=lambda invite: (invite.live(now), invite.created_at))


def _invites_by_hash(conn: Conn, code_hash: str, channel: str) -> list[_Candidate]:
    rows = conn.execute(
        "SELECT id, contact_id, status, expires_at, use_count, max_uses, created_at"
        " FROM ingress_invites WHERE invite_code_hash = ? AND source_channel = ?",
        (code_hash, channel),
    )
    return [_Candidate(*row) for row in rows]


def _refusal(invite: _Candidate | None, channels: list[Channel], now: int) -> DomainError | None:
    blocked = any(c.status == "blocked" or c.policy == "deny" for c in channels)
    if invite is None or blocked:
        # A blocked sender hears the same as a wrong code: membership does not leak.
        return InviteInvalid("no invite matches this code on this channel")
    if invite.status == "revoked":
        return InviteRevoked("this invite was revoked")
    if invite.status == "expired" or invite.expires_at <= now:
        return InviteExpired("this invite has expired")
    if invite.status != "active" or invite.use_count >= invite.max_uses:
        return _exhausted()
    return None


def _redeemed_by_sender(invite: _Candidate | None, channels: list[Channel]) -> Channel | None:
    """The sender's active channel made by redeeming this very invite, if it has one."""
    if invite is None:
        return None
    return next((c for c in channels if c.invite_id == invite.id and c.status == "active"), None)


def _exhausted() -> InviteExhausted:
    return InviteExhausted("this invite has no uses left")


def _claim(conn: Conn, invite: _Candidate, sender: Sender, now: int) -> bool:
    """Take one use with a single guarded UPDATE; False when none was left."""
    return bool(
        conn.changes_of(
            "UPDATE ingress_invites SET use_count = use_count + 1,"
            " status = CASE WHEN use_count + 1 >= max_uses THEN 'redeemed' ELSE status END,"
            " redeemed_by_external_user_id = ?, redeemed_by_external_chat_id = ?,"
            " redeemed_at = ?, updated_at = ?"
            " WHERE id = ? AND status = 'active' AND expires_at > ? AND use_count < max_uses",
            (sender.external_user_id, sender.external_chat_id, now, now, invite.id, now),
        )
    )


def _upsert_channel(
    conn: Conn, invite: _Candidate, known: Channel | None, sender: Sender, now: int
) -> str:
    if known is not None:
        conn.execute(
            "UPDATE contact_channels SET status = 'active', verified_at = ?,"
            " verified_via = 'invite',"
            " invite_id = ?, external_user_id = coalesce(?, external_user_id),"
            " external_chat_id = coalesce(?, external_chat_id), updated_at = ? WHERE id = ?",
            (now, invite.id, sender.external_user_id, sender.external_chat_id, now, known.id),
        )
        return known.id
    channel_id = new_id("ch")
    address = sender.address or sender.external_user_id or sender.external_chat_id
    conn.execute(
        "INSERT INTO contact_channels (id, contact_id, type, address, external_user_id,"
        " external_chat_id, status, verified_at, verified_via, invite_id, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, 'active', ?, 'invite', ?, ?, ?)",
        (
            channel_id, invite.contact_id, sender.channel, address, sender.external_user_id,
            sender.external_chat_id, now, invite.id, now, now,
        ),
    )  # fmt: skip
    return channel_id


def _event(invite: _Candidate, channel_id: str, sender: Sender, now: int) -> dict[str, Any]:
    return {
        "inviteId": invite.id,
        "contactId": invite.contact_id,
        "channelId": channel_id,
        "sourceChannel": sender.channel,
        "externalUserId": sender.external_user_id,
        "externalChatId": sender.external_chat_id,
        "displayName": sender.display_name,
        "redeemedAt": now,
    }


def revoke(conn: Conn, invite_id: str) -> Invite:
    """Revoke an active invite; a terminal one (redeemed, expired, revoked) is returned as is."""
    now = now_ms()
    with transaction(conn):
        invite = _get(conn, invite_id, now)
        if invite.status == "active":
            conn.execute(
                "UPDATE ingress_invites SET status = 'revoked', updated_at = ? WHERE id = ?",
                (now, invite_id),
            )
            invite.status, invite.updated_at = "revoked", now
    return invite


def _get(conn: Conn, invite_id: str, now: int) -> Invite:
    rows = conn.execute(f"SELECT {INVITE_COLUMNS} FROM ingress_invites WHERE id = ?", (invite_id,))
    if not rows:
        raise not_found("invite", invite_id)
    return invite_of(rows[0], now)


_STATUS_FILTERS = {
    "active": "status = 'active' AND expires_at > :now",
    "expired": "(status = 'expired' OR (status = 'active' AND expires_at <= :now))",
    "redeemed": "status = 'redeemed'",
    "revoked": "status = 'revoked'",
}


def list_invites(
    conn: Conn,
    *,
    status: str | None,
    channel: str | None,
    contact_id: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Invite], str | None]:
    now = now_ms()
    where = ["id > :after"]
    if status is not None:
        where.append(_STATUS_FILTERS[status])
    if channel is not None:
        where.append("source_channel = :channel")
    if contact_id is not None:
        where.append("contact_id = :contact")
    rows = conn.db.execute(
        f"SELECT {INVITE_COLUMNS} FROM ingress_invites WHERE {' AND '.join(where)}"
        " ORDER BY id LIMIT :limit",
        {
            "after": decode_cursor(cursor),
            "now": now,
            "channel": channel,
            "contact": contact_id,
            "limit": limit + 1,
        },
    ).fetchall()
    invites = [invite_of(row, now) for row in rows[:limit]]
    next_cursor = encode_cursor(invites[-1].id) if len(rows) > limit else None
    return invites, next_cursor


def sweep(conn: Conn, limits: GuessLimits) -> tuple[int, int]:
    """Mark lapsed invites expired and forget failures older than the window."""
    now = now_ms()
    with transaction(conn):
        expired = conn.changes_of(
            "UPDATE ingress_invites SET status = 'expired', updated_at = ?"
            " WHERE status = 'active' AND expires_at <= ?",
            (now, now),
        )
        forgotten = conn.changes_of(
            "DELETE FROM redeem_failures WHERE at <= ?", (now - limits.window_ms,)
        )
    return expired, forgotten
