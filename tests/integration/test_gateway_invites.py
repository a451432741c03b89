"""gatewayd's contacts and invites, through the real client against the real daemons."""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
import apsw
import pytest

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError
from pair.testing import Pair
from pair.testing.daemons import run_once
from pair.testing.plugin import PairFactory
from tests.support.calls import failure
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
async def gw(pair: Pair) -> Any:
    async with Client(pair.gateway_socket) as client:
        yield client


async def new_contact(gw: Client, name: str = "Alice") -> str:
    return str((await gw.call("contacts_create", {"displayName": name}))["contact"]["id"])


async def new_invite(gw: Client, contact_id: str, **extra: Any) -> tuple[dict[str, Any], str]:
    created = await gw.call(
        "invites_create", {"contactId": contact_id, "sourceChannel": "telegram", **extra}
    )
    return created["invite"], created["code"]


async def redeem(gw: Client, code: str, user: str | None, channel: str = "telegram") -> Any:
    params: dict[str, Any] = {"sourceChannel": channel, "code": code}
    if user is not None:
        params["externalUserId"] = user
    return await gw.call("invites_redeem", params)


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


async def test_the_whole_invite_life_cycle(gw: Client) -> None:
    contact_id = await new_contact(gw)
    invite, code = await new_invite(gw, contact_id, maxUses=2, note="for the family chat")
    assert len(code) == 6
    assert code.isdigit()
    assert invite["useCount"] == 0
    assert invite["status"] == "active"

    first = await redeem(gw, code, "u1")
    assert first["outcome"] == "redeemed"
    assert first["contactId"] == contact_id
    again = await redeem(gw, code, "u1")
    assert again == {**first, "outcome": "already_member"}
    second = await redeem(gw, code, "u2")
    assert second["outcome"] == "redeemed"
    assert second["channelId"] != first["channelId"]
    error = await failure(redeem(gw, code, "u3"))
    assert (error.code, error.status_code) == ("INVITE_EXHAUSTED", 410)

    listed = (await gw.call("invites_list", {"contactId": contact_id}))["invites"]
    assert [(i["id"], i["useCount"], i["status"]) for i in listed] == [
        (invite["id"], 2, "redeemed")
    ]
    assert code not in str(listed)
    assert not any("hash" in key.lower() for key in listed[0])

    detail = await gw.call("contacts_get", {"id": contact_id})
    channels = {c["externalUserId"]: c for c in detail["channels"]}
    assert set(channels) == {"u1", "u2"}
    assert channels["u1"]["status"] == "active"
    assert channels["u1"]["verifiedVia"] == "invite"
    assert channels["u1"]["inviteId"] == invite["id"]


async def test_revoke_is_idempotent_and_a_revoked_code_is_refused(gw: Client) -> None:
    invite, code = await new_invite(gw, await new_contact(gw))
    revoked = (await gw.call("invites_revoke", {"id": invite["id"]}))["invite"]
    assert revoked["status"] == "revoked"
    assert (await gw.call("invites_revoke", {"id": invite["id"]}))["invite"] == revoked
    error = await failure(redeem(gw, code, "u1"))
    assert (error.code, error.status_code) == ("INVITE_REVOKED", 410)
    missing = await failure(gw.call("invites_revoke", {"id": "inv_nope"}))
    assert (missing.code, missing.status_code) == ("NOT_FOUND", 404)


async def test_an_expired_invite_is_refused_and_listed_as_expired(gw: Client) -> None:
    invite, code = await new_invite(gw, await new_contact(gw), ttlSeconds=1)
    while time.time() * 1000 <= invite["expiresAt"]:
        await anyio.sleep(invite["expiresAt"] / 1000 - time.time() + 0.001)
    error = await failure(redeem(gw, code, "u1"))
    assert (error.code, error.status_code) == ("INVITE_EXPIRED", 410)
    expired = (await gw.call("invites_list", {"status": "expired"}))["invites"]
    assert [i["id"] for i in expired] == [invite["id"]]
    assert (await gw.call("invites_list", {"status": "active"}))["invites"] == []


async def test_two_hundred_concurrent_redemptions_of_the_last_use_have_one_winner(
    pair: Pair,
) -> None:
    async with Client(pair.gateway_socket) as gw:
        _invite, code = await new_invite(gw, await new_contact(gw))
    outcomes: list[str] = []

    async def attempt(n: int) -> None:
        async with Client(pair.gateway_socket) as client:
            try:
                outcomes.append((await redeem(client, code, f"racer-{n}"))["outcome"])
            except IpcHandlerError as exc:
                outcomes.append(exc.code)

    async with anyio.create_task_group() as task_group:
        for n in range(200):
            task_group.start_soon(attempt, n)
    assert sorted(set(outcomes)) == ["INVITE_EXHAUSTED", "RATE_LIMITED", "redeemed"] or sorted(
        set(outcomes)
    ) == ["INVITE_EXHAUSTED", "redeemed"]
    assert outcomes.count("redeemed") == 1
    async with Client(pair.gateway_socket) as gw:
        listed = (await gw.call("invites_list", {}))["invites"]
    assert listed[0]["useCount"] == 1


async def test_a_sender_without_identity_is_refused(gw: Client) -> None:
    _, code = await new_invite(gw, await new_contact(gw))
    error = await failure(redeem(gw, code, None))
    assert (error.code, error.status_code) == ("INVITE_MISSING_IDENTITY", 400)
    assert (await gw.call("invites_list", {}))["invites"][0]["useCount"] == 0


async def test_a_blocked_sender_hears_invalid_like_a_wrong_code(gw: Client, pair: Pair) -> None:
    contact_id = await new_contact(gw)
    _first, code = await new_invite(gw, contact_id, maxUses=5)
    await redeem(gw, code, "mallory")
    db = apsw.Connection(str(pair.state / "gateway.db"))
    db.set_busy_timeout(5000)
    db.execute("UPDATE contact_channels SET status = 'blocked' WHERE external_user_id = 'mallory'")
    db.close()
    _, other_code = await new_invite(gw, await new_contact(gw, "Bob"))
    blocked = await failure(redeem(gw, other_code, "mallory"))
    unknown = await failure(redeem(gw, wrong(other_code), "someone"))
    assert (blocked.code, blocked.status_code, blocked.message) == (
        unknown.code,
        unknown.status_code,
        unknown.message,
    )
    assert blocked.code == "INVITE_INVALID"


async def test_guess_limits_stop_a_guesser_and_survive_a_restart(pair: Pair) -> None:
    async with Client(pair.gateway_socket) as gw:
        _, code = await new_invite(gw, await new_contact(gw))
        for _ in range(5):
            assert (await failure(redeem(gw, wrong(code), "guesser"))).code == "INVITE_INVALID"
        limited = await failure(redeem(gw, code, "guesser"))
    assert (limited.code, limited.status_code, limited.retryable) == ("RATE_LIMITED", 429, True)
    assert 0 < limited.data["retryAfterMs"] <= 15 * 60 * 1000
    # Said for a person: a 15-minute window reads "retry in 15 min", not in milliseconds.
    assert limited.message.endswith("; retry in 15 min")
    assert pair.gateway.stop() == 0
    pair.gateway.restart()
    async with Client(pair.gateway_socket) as gw:
        assert (await failure(redeem(gw, code, "guesser"))).code == "RATE_LIMITED"
        assert (await redeem(gw, code, "honest"))["outcome"] == "redeemed"


async def test_a_successful_redemption_clears_the_senders_failed_attempts(gw: Client) -> None:
    contact = await new_contact(gw)
    for _ in range(2):
        _, code = await new_invite(gw, contact)
        for _ in range(4):
            assert (await failure(redeem(gw, wrong(code), "typo"))).code == "INVITE_INVALID"
        # Four failures, then the right code: the count starts again from zero.
        assert (await redeem(gw, code, "typo"))["outcome"] in ("redeemed", "already_member")


async def test_the_channel_limit_stops_guessing_spread_over_many_senders(
    pair_factory: PairFactory,
) -> None:
    both = pair_factory(gateway_args=("--guess-limit-channel", "8"))
    async with Client(both.gateway_socket) as gw:
        _, code = await new_invite(gw, await new_contact(gw))
        for n in range(8):
            await failure(redeem(gw, wrong(code), f"bot-{n}"))
        limited = await failure(redeem(gw, code, "bot-new"))
        assert limited.code == "RATE_LIMITED"
        other_channel = await failure(redeem(gw, wrong(code), "bot-new", channel="sms"))
        assert other_channel.code == "INVITE_INVALID"


async def test_deleting_a_contact_cascades_and_tells_the_assistant(gw: Client, pair: Pair) -> None:
    contact_id = await new_contact(gw)
    _, code = await new_invite(gw, contact_id, maxUses=3)
    await redeem(gw, code, "u1")
    assert await gw.call("contacts_delete", {"id": contact_id}) == {"deleted": True}
    assert (await gw.call("invites_list", {"contactId": contact_id}))["invites"] == []
    gone = await failure(gw.call("contacts_get", {"id": contact_id}))
    assert (gone.code, gone.status_code) == ("NOT_FOUND", 404)
    assert (await failure(redeem(gw, code, "u2"))).code == "INVITE_INVALID"
    again = await failure(gw.call("contacts_delete", {"id": contact_id}))
    assert again.code == "NOT_FOUND"
    async with Client(pair.assistant_socket) as assistant:

        async def deleted_event_arrived() -> bool:
            found = await assistant.call(
                "db_proxy",
                {
                    "sql": "SELECT count(*) AS n FROM events WHERE kind = 'contacts_changed'"
                    " AND json_extract(payload, '$.change') = 'deleted'",
                    "mode": "query",
                },
            )
            return bool(found["rows"][0]["n"] == 1)

        await eventually(deleted_event_arrived)


async def test_channel_inbound_redeems_touches_or_ignores(gw: Client) -> None:
    contact_id = await new_contact(gw)
    _, code = await new_invite(gw, contact_id)
    inbound = {"sourceChannel": "telegram", "externalUserId": "u9"}
    assert await gw.call("channel_inbound", {**inbound, "text": "hello"}) == {"outcome": "unknown"}
    joined = await gw.call("channel_inbound", {**inbound, "text": f" {code}\n"})
    assert joined["outcome"] == "redeemed"
    assert joined["contactId"] == contact_id
    for _ in range(2):
        known = await gw.call("channel_inbound", {**inbound, "text": "how are you"})
        assert known == {
            "outcome": "known",
            "contactId": contact_id,
            "channelId": joined["channelId"],
        }
    channel = (await gw.call("contacts_get", {"id": contact_id}))["channels"][0]
    assert channel["interactionCount"] == 2
    assert channel["lastSeenAt"] >= channel["verifiedAt"]


async def test_contacts_list_pages_through_every_contact_once(gw: Client) -> None:
    ids = {await new_contact(gw, f"C{n}") for n in range(7)}
    seen: list[str] = []
    cursor = None
    while True:
        page = await gw.call(
            "contacts_list", {"limit": 3, **({"cursor": cursor} if cursor else {})}
        )
        seen += [contact["id"] for contact in page["contacts"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)


async def test_codes_and_the_key_never_reach_the_logs(gw: Client, pair: Pair) -> None:
    _invite, code = await new_invite(gw, await new_contact(gw))
    await redeem(gw, code, "u1")
    await failure(redeem(gw, code, "u2"))
    key_path = pair.state / "gateway.key"
    assert (key_path.stat().st_mode & 0o777) == 0o600
    assert len(key_path.read_bytes()) == 32
    log = pair.gateway.stderr()
    assert code not in log
    assert key_path.read_bytes().hex() not in log
    assert os.path.getsize(pair.state / "gateway.db") > 0


async def test_no_new_key_is_made_beside_invites_hashed_with_the_lost_one(
    gw: Client, pair: Pair
) -> None:
    """A restore cut between the database and its key, or a key deleted by hand: a fresh
    key would kill every open code silently; the gateway refuses to start instead."""
    _invite, code = await new_invite(gw, await new_contact(gw))
    await gw.aclose()
    pair.gateway.stop()
    key = pair.state / "gateway.key"
    kept = key.read_bytes()
    key.unlink()
    args = ["--runtime-dir", str(pair.runtime), "--state-dir", str(pair.state)]
    refused = run_once("pair.gateway", *args)
    assert refused.returncode == 78
    assert f"key file {key} is missing, but the database holds 1 invite(s)" in refused.stderr
    assert not key.exists()
    key.write_bytes(kept)
    pair.gateway.start()
    async with Client(pair.gateway_socket) as again:
        assert (await redeem(again, code, "u1"))["outcome"] == "redeemed"


async def test_a_sender_of_one_contact_joins_another_once(gw: Client) -> None:
    _, code_a = await new_invite(gw, await new_contact(gw, "A"))
    contact_b = await new_contact(gw, "B")
    invite_b, code_b = await new_invite(gw, contact_b, maxUses=5)
    await redeem(gw, code_a, "shared")
    joined = await redeem(gw, code_b, "shared")
    assert joined["outcome"] == "redeemed"
    assert joined["contactId"] == contact_b
    again = await redeem(gw, code_b, "shared")
    assert again == {**joined, "outcome": "already_member"}
    listed = (await gw.call("invites_list", {"contactId": contact_b}))["invites"]
    assert [(i["id"], i["useCount"]) for i in listed] == [(invite_b["id"], 1)]
    channels = (await gw.call("contacts_get", {"id": contact_b}))["channels"]
    assert len(channels) == 1
