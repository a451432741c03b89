"""The gateway's rules, run on a real gateway.db in tmp_path with no process or socket.

Redemption (claims, membership, limits), contacts and the outbox's bookkeeping
are plain functions of a connection; these tests call them as the database
thread does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pair.gateway import contacts, invites
from pair.gateway.codes import CodeHasher
from pair.gateway.db import MIGRATIONS
from pair.gateway.errors import (
    InviteExhausted,
    InviteExpired,
    InviteInvalid,
    InviteMissingIdentity,
    NotFound,
    RateLimited,
)
from pair.gateway.invites import GuessLimits, Sender
from pair.gateway.outbox import backlog_bounds, mark_delivered, pending_events, queued_through
from pair.runtime.sqlite import Conn, connect, migrate, watch_deadline
from tests.support.sqlite import count

HASHER = CodeHasher(b"k" * 32)
LIMITS = GuessLimits(per_sender=3, per_channel=5, window_ms=60_000)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[Conn]:
    db = connect(str(tmp_path / "gateway.db"))
    connection = Conn(db, watch_deadline(db))
    migrate(connection, MIGRATIONS, log=lambda _: None)
    try:
        yield connection
    finally:
        db.close()


def new_invite(conn: Conn, max_uses: int = 1, channel: str = "sms") -> tuple[str, str, str]:
    """(contact id, invite id, code)."""
    contact = contacts.create_contact(conn, "Kim", "contact", None)
    invite, code = invites.create_invite(conn, HASHER, contact.id, channel, max_uses, 3600, None)
    return contact.id, invite.id, code


def redeem(conn: Conn, code: str, user: str, channel: str = "sms") -> invites.Redemption:
    return invites.redeem(conn, HASHER, LIMITS, Sender(channel, user, None), code)


def use_count(conn: Conn, invite_id: str) -> int:
    return count(conn.db, "SELECT use_count FROM ingress_invites WHERE id = ?", (invite_id,))


def failures(conn: Conn) -> int:
    return count(conn.db, "SELECT count(*) FROM redeem_failures")


def test_a_redemption_claims_a_use_makes_the_sender_a_member_and_queues_its_event(
    conn: Conn,
) -> None:
    contact_id, invite_id, code = new_invite(conn)
    redemption = redeem(conn, code, "u1")
    assert (redemption.outcome, redemption.contact_id) == ("redeemed", contact_id)
    assert use_count(conn, invite_id) == 1
    _, channels = contacts.get_contact(conn, contact_id)
    assert [(c.external_user_id, c.status) for c in channels] == [("u1", "active")]
    kinds = [event.kind for event in pending_events(conn)]
    assert kinds == ["contacts_changed", "invite_redeemed"]
    listed, _ = invites.list_invites(
        conn, status=None, channel=None, contact_id=None, limit=10, cursor=None
    )
    assert [i.status for i in listed] == ["redeemed"]


def test_a_member_redeeming_again_consumes_no_use_and_records_no_failure(conn: Conn) -> None:
    _, invite_id, code = new_invite(conn, max_uses=2)
    redeem(conn, code, "u1")
    again = redeem(conn, code, "u1")
    assert again.outcome == "already_member"
    assert use_count(conn, invite_id) == 1
    assert failures(conn) == 0


def test_the_last_use_taken_refuses_the_next_sender_and_counts_a_failure(conn: Conn) -> None:
    _, invite_id, code = new_invite(conn)
    redeem(conn, code, "u1")
    with pytest.raises(InviteExhausted):
        redeem(conn, code, "u2")
    assert use_count(conn, invite_id) == 1
    assert failures(conn) == 2  # one per scope: the sender and the channel


def test_a_lapsed_invite_is_expired_whatever_its_stored_status(conn: Conn) -> None:
    _, invite_id, code = new_invite(conn)
    conn.execute("UPDATE ingress_invites SET expires_at = 1 WHERE id = ?", (invite_id,))
    with pytest.raises(InviteExpired):
        redeem(conn, code, "u1")
    assert invites.sweep(conn, LIMITS)[0] == 1


def test_a_sender_over_its_limit_is_rate_limited_then_the_channel_for_everyone(
    conn: Conn,
) -> None:
    _, _, code = new_invite(conn)
    wrong = "000000" if code != "000000" else "111111"
    for _ in range(LIMITS.per_sender):
        with pytest.raises(InviteInvalid):
            redeem(conn, wrong, "guesser")
    with pytest.raises(RateLimited) as caught:
        redeem(conn, code, "guesser")
    assert 0 < caught.value.data["retryAfterMs"] <= LIMITS.window_ms
    for _ in range(LIMITS.per_channel - LIMITS.per_sender):
        with pytest.raises(InviteInvalid):
            redeem(conn, wrong, "another")
    with pytest.raises(RateLimited):
        redeem(conn, code, "honest")
    _, _, other_code = new_invite(conn, channel="telegram")
    assert redeem(conn, other_code, "honest", channel="telegram").outcome == "redeemed"


def test_a_redemption_needs_an_identity_and_a_code_on_its_own_channel(conn: Conn) -> None:
    _, _, code = new_invite(conn, channel="telegram")
    with pytest.raises(InviteMissingIdentity):
        invites.redeem(conn, HASHER, LIMITS, Sender("telegram", None, None), code)
    with pytest.raises(InviteInvalid):
        redeem(conn, code, "u1", channel="sms")


def test_deleting_a_contact_takes_its_invites_and_queues_an_event(conn: Conn) -> None:
    contact_id, _, _ = new_invite(conn)
    contacts.delete_contact(conn, contact_id)
    assert count(conn.db, "SELECT count(*) FROM ingress_invites") == 0
    assert [e.kind for e in pending_events(conn)][-1] == "contacts_changed"
    with pytest.raises(NotFound):
        contacts.delete_contact(conn, contact_id)


def test_the_outbox_watermarks_follow_queued_and_delivered_events(conn: Conn) -> None:
    assert backlog_bounds(conn) == (0, 0, None)
    new_invite(conn)
    new_invite(conn)
    queued = queued_through(conn)
    first, second = pending_events(conn)[:2]
    assert backlog_bounds(conn) == (0, queued, first.created_at)
    mark_delivered(conn, first.seq)
    assert backlog_bounds(conn) == (first.seq, queued, second.created_at)
    mark_delivered(conn, queued)
    assert backlog_bounds(conn) == (queued, queued, None)
    new_invite(conn)
    assert queued_through(conn) == queued + 1, "a sequence number is never reused"


def test_a_redemption_retried_after_a_lost_answer_is_already_member_even_when_used_up(
    conn: Conn,
) -> None:
    _, invite_id, code = new_invite(conn)
    first = redeem(conn, code, "u1")
    again = redeem(conn, code, "u1")
    assert (again.outcome, again.channel_id) == ("already_member", first.channel_id)
    assert use_count(conn, invite_id) == 1
    assert failures(conn) == 0


def test_a_sender_with_a_user_id_has_one_guess_budget_whatever_its_chat_id(conn: Conn) -> None:
    _, _, code = new_invite(conn)
    wrong = "000000" if code != "000000" else "111111"
    for chat in range(LIMITS.per_sender):
        with pytest.raises(InviteInvalid):
            invites.redeem(conn, HASHER, LIMITS, Sender("sms", "guesser", f"chat{chat}"), wrong)
    with pytest.raises(RateLimited, match="this sender"):
        invites.redeem(conn, HASHER, LIMITS, Sender("sms", "guesser", "a-new-chat"), code)
