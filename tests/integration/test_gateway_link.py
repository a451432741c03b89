"""The gateway with the assistant away, late, or restarted; and crashes of the gateway itself."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import apsw
import pytest

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError, IpcTransportError
from pair.testing import Pair, crash_at
from tests.support.sqlite import count
from tests.support.waiting import (
    eventually,
    gateway_health_reaches,
    migrations_done,
    outbox_drained,
)

pytestmark = pytest.mark.anyio

NOW_MS = "CAST(unixepoch('subsec') * 1000 AS INTEGER)"


async def health(pair: Pair) -> Any:
    async with Client(pair.gateway_socket) as gw:
        return await gw.call("health")


async def events(pair: Pair, kind: str = "invite_redeemed") -> list[dict[str, Any]]:
    async with Client(pair.assistant_socket) as assistant:
        found = await assistant.call(
            "db_proxy",
            {
                "sql": "SELECT id, payload FROM events WHERE kind = ?",
                "mode": "query",
                "bind": [kind],
            },
        )
    return found["rows"]  # type: ignore[no-any-return]


async def invite_with_code(gw: Client, max_uses: int) -> tuple[str, str]:
    contact = (await gw.call("contacts_create", {"displayName": "Kim"}))["contact"]["id"]
    created = await gw.call(
        "invites_create", {"contactId": contact, "sourceChannel": "sms", "maxUses": max_uses}
    )
    return created["invite"]["id"], created["code"]


async def test_redemption_works_with_the_assistant_down_and_events_arrive_once_after(
    pair: Pair,
) -> None:
    async with Client(pair.gateway_socket) as gw:
        _, code = await invite_with_code(gw, 10)
        pair.assistant.kill()
        for n in range(6):
            outcome = await gw.call(
                "invites_redeem", {"sourceChannel": "sms", "code": code, "externalUserId": f"p{n}"}
            )
            assert outcome["outcome"] == "redeemed"

        async def link_down() -> bool:
            state = (await gw.call("health"))["assistant"]
            return bool(state["state"] == "down" and state["lastError"])

        await eventually(link_down)
        assert (await gw.call("health"))["outbox"]["pending"] >= 6
        pair.assistant.restart()

        await gateway_health_reaches(pair.gateway_socket, outbox_drained)
    delivered = await events(pair)
    assert len(delivered) == 6
    assert len({row["id"] for row in delivered}) == 6
    assert (await health(pair))["assistant"]["state"] == "connected"


async def test_the_gateway_started_first_serves_invites_and_converges(short_tmp: Path) -> None:
    with Pair(short_tmp).checked() as both:
        both.gateway.start()
        early = await health(both)
        assert early["assistant"]["state"] in ("unknown", "down")
        assert early["migrations"]["pending"] == 1
        async with Client(both.gateway_socket) as gw:
            _, code = await invite_with_code(gw, 1)
            await gw.call(
                "invites_redeem", {"sourceChannel": "sms", "code": code, "externalUserId": "early"}
            )
        both.assistant.start()

        async def converged() -> bool:
            state = await health(both)
            return bool(
                state["assistant"]["state"] == "connected"
                and state["migrations"]["pending"] == 0
                and state["outbox"]["pending"] == 0
            )

        await eventually(converged)
        assert len(await events(both)) == 1
        # systemd's STATUS= follows the link: `systemctl status` shows it connected.
        db = both.gateway.state_dir / "gateway.db"
        await anyio.to_thread.run_sync(
            both.gateway.wait_for, f"STATUS=serving {db}; assistant link connected"
        )


async def test_a_failing_assistant_health_is_reported_not_fatal(short_tmp: Path) -> None:
    """An assistant socket that answers every call with an error: reported, never fatal."""
    both = Pair(short_tmp)
    fake = both.runtime / "assistant.sock"

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(fake))
    server.listen()
    answer = (
        b'{"jsonrpc":"2.0","id":1,"error":{"code":-32603,"message":"boom",'
        b'"data":{"statusCode":500,"errorCode":"INTERNAL_ERROR","retryable":false}}}'
    )

    def serve_errors() -> None:
        conn, _ = server.accept()
        with conn, contextlib.suppress(OSError):
            while header := conn.recv(4):
                body = conn.recv(struct.unpack(">I", header)[0])
                request_id = json.loads(body)["id"]
                reply = answer.replace(b'"id":1', b'"id":%d' % request_id)
                conn.sendall(struct.pack(">I", len(reply)) + reply)

    with both.checked():
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(anyio.to_thread.run_sync, serve_errors)
            both.gateway.start()

            async def reported() -> bool:
                link = (await health(both))["assistant"]
                return bool(link["lastError"] and "INTERNAL_ERROR" in link["lastError"])

            await eventually(reported)
            assert both.gateway.proc is not None
            assert both.gateway.proc.poll() is None
            both.gateway.kill()
            server.close()


def seed_legacy(db_path: Path, code_of: dict[str, str]) -> None:
    db = apsw.Connection(str(db_path))
    db.set_busy_timeout(5000)
    for invite_id, code in code_of.items():
        status, expires = ("active", f"{NOW_MS} + 3600000")
        if invite_id == "legacy-expired":
            expires = f"{NOW_MS} - 1000"
        db.execute(
            "INSERT INTO assistant_ingress_invites (id, source_channel, token_hash,"
            " invite_code_hash, max_uses, use_count, expires_at, status, contact_id, friend_name,"
            " created_at, updated_at)"
            f" VALUES (?, 'telegram', 'tok', ?, 1, 0, {expires}, ?, NULL, 'Legacy Friend', 1, 1)",
            (invite_id, hashlib.sha256(code.encode()).hexdigest(), status),
        )
    db.close()


LEGACY = {"legacy-a": "111111", "legacy-b": "222222", "legacy-expired": "333333"}


async def legacy_left(pair: Pair) -> list[str]:
    async with Client(pair.assistant_socket) as assistant:
        rows = (
            await assistant.call(
                "db_proxy",
                {"sql": "SELECT id FROM assistant_ingress_invites ORDER BY id", "mode": "query"},
            )
        )["rows"]
    return [row["id"] for row in rows]


async def assert_legacy_imported(pair: Pair) -> None:
    assert await legacy_left(pair) == ["legacy-expired"]
    async with Client(pair.gateway_socket) as gw:
        listed = (await gw.call("invites_list", {"sourceChannel": "telegram"}))["invites"]
        assert sorted(invite["id"] for invite in listed) == ["legacy-a", "legacy-b"]
        redeemed = await gw.call(
            "invites_redeem",
            {"sourceChannel": "telegram", "code": "111111", "externalUserId": "old"},
        )
        assert redeemed["inviteId"] == "legacy-a"
        with pytest.raises(IpcHandlerError) as caught:
            await gw.call(
                "invites_redeem",
                {"sourceChannel": "telegram", "code": "333333", "externalUserId": "late"},
            )
        assert caught.value.code == "INVITE_INVALID"


@contextlib.contextmanager
def with_legacy(root: Path) -> Iterator[Pair]:
    """The assistant up with legacy invites in its database; the gateway not started."""
    with Pair(root).checked() as both:
        both.assistant.start()
        seed_legacy(both.state / "assistant.db", LEGACY)
        yield both


async def test_the_legacy_migration_moves_active_invites_once(short_tmp: Path) -> None:
    with with_legacy(short_tmp) as both:
        both.gateway.start()
        await gateway_health_reaches(both.gateway_socket, migrations_done)
        await assert_legacy_imported(both)


async def test_a_gateway_killed_between_import_and_delete_converges_on_restart(
    short_tmp: Path,
) -> None:
    with with_legacy(short_tmp) as both:
        with crash_at(both.gateway, "after_legacy_import"):
            both.gateway.start(wait=False)
        assert await legacy_left(both) == ["legacy-a", "legacy-b", "legacy-expired"]
        both.gateway.restart()
        await gateway_health_reaches(both.gateway_socket, migrations_done)
        await assert_legacy_imported(both)


async def test_sigkill_mid_redemptions_leaves_invites_and_channels_consistent(pair: Pair) -> None:
    async with Client(pair.gateway_socket) as gw:
        invite_id, code = await invite_with_code(gw, 1000)
    acknowledged: set[str] = set()

    async def redeemer(lane: int) -> None:
        async with Client(pair.gateway_socket) as client:
            for n in range(200):
                sender = f"s{lane}-{n}"
                try:
                    await client.call(
                        "invites_redeem",
                        {"sourceChannel": "sms", "code": code, "externalUserId": sender},
                    )
                except IpcTransportError:
                    return
                acknowledged.add(sender)

    async def killer() -> None:
        while len(acknowledged) < 100:
            await anyio.sleep(0.002)
        pair.gateway.kill()

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(killer)
        for lane in range(4):
            task_group.start_soon(redeemer, lane)

    db = apsw.Connection(str(pair.state / "gateway.db"))
    use_count = count(db, "SELECT use_count FROM ingress_invites WHERE id = ?", (invite_id,))
    channels = {row[0] for row in db.execute("SELECT external_user_id FROM contact_channels")}
    queued = count(db, "SELECT count(*) FROM outbox WHERE kind = 'invite_redeemed'")
    db.close()
    assert use_count == len(channels)
    assert acknowledged <= channels
    pair.gateway.restart()

    await gateway_health_reaches(pair.gateway_socket, outbox_drained)
    delivered = await events(pair)
    assert len(delivered) == use_count
    assert queued <= use_count


async def test_an_event_the_assistant_always_refuses_is_set_aside_not_blocking(pair: Pair) -> None:
    """Refused four times before (by an earlier gateway process: the count is in the
    table), the event is set aside at its fifth refusal, not five more."""
    db = apsw.Connection(str(pair.state / "gateway.db"))
    db.set_busy_timeout(5000)
    db.execute(
        "INSERT INTO outbox (event_id, kind, payload, created_at, attempts)"
        " VALUES ('ev_poison', 'bogus', '{}', 1, 4)"
    )
    db.close()
    async with Client(pair.gateway_socket) as gw:
        await gw.call("contacts_create", {"displayName": "After the poison"})

        async def settled() -> bool:
            outbox = (await gw.call("health"))["outbox"]
            return bool(outbox["dead"] == 1 and outbox["pending"] == 0)

        await eventually(settled)
    assert len(await events(pair, "contacts_changed")) == 1
    db = apsw.Connection(str(pair.state / "gateway.db"))
    dead = db.execute("SELECT event_id, attempts, last_error FROM outbox_dead").fetchall()
    db.close()
    assert dead[0][0] == "ev_poison"
    assert dead[0][1] == 5
    assert "INVALID_PARAMS" in str(dead[0][2])
