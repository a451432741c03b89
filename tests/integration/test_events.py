"""Events from the gateway's outbox to the assistant: batches, a poison event, full disks, kills.

Every event the gateway acknowledged reaches the assistant exactly once and
in order, whatever happens on the way; only an event the assistant refuses
for what it is ends in `outbox_dead`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from pair.gateway.outbox import DEAD_AFTER
from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError
from pair.testing import Pair, crash_at
from pair.testing.daemons import DaemonProcess
from tests.support.alerts import conditions_holding, metrics_of
from tests.support.disk import disk_full, needs_root, small_disk
from tests.support.sqlite import count
from tests.support.waiting import eventually, gateway_health_reaches, outbox_drained

pytestmark = pytest.mark.anyio


def event(n: int, kind: str = "contacts_changed", **payload: Any) -> dict[str, Any]:
    return {"id": f"e{n}", "kind": kind, "payload": payload or {"n": n}}


async def stored_ids(client: Client, kind: str | None = None) -> list[str]:
    where, bind = ("WHERE kind = ?", [kind]) if kind else ("", [])
    found = await client.call(
        "db_proxy",
        {
            "sql": f"SELECT id FROM events {where} ORDER BY rowid",
            "mode": "query",
            "bind": bind,
            "maxRows": 100_000,
        },
    )
    return [row["id"] for row in found["rows"]]


# -- emit_events --------------------------------------------------------------


async def test_emit_events_stores_in_order_and_lists_what_was_already_there(
    assistant_socket: str,
) -> None:
    async with Client(assistant_socket) as client:
        first = await client.call("emit_events", {"events": [event(1), event(2)]})
        assert first == {"accepted": 2, "duplicates": []}
        again = await client.call("emit_events", {"events": [event(2), event(3), event(3)]})
        assert again == {"accepted": 1, "duplicates": ["e2", "e3"]}
        assert await stored_ids(client) == ["e1", "e2", "e3"]


@pytest.mark.parametrize(
    ("events", "path"),
    [
        ([], "$.events"),
        ([event(n) for n in range(501)], "$.events"),
        ([event(0), event(1), event(2), event(3, kind="nope")], "$.events[3].kind"),
        (
            [event(0), {"id": "e1", "kind": "contacts_changed", "payload": [1]}],
            "$.events[1].payload",
        ),
        ([{"id": "", "kind": "contacts_changed", "payload": {}}], "$.events[0].id"),
        ([{"id": "x" * 201, "kind": "contacts_changed", "payload": {}}], "$.events[0].id"),
    ],
    ids=["none", "501", "unknown kind", "payload not an object", "empty id", "id too long"],
)
async def test_an_invalid_batch_is_refused_whole_with_the_path_and_stores_nothing(
    assistant_socket: str, events: list[dict[str, Any]], path: str
) -> None:
    async with Client(assistant_socket) as client:
        with pytest.raises(IpcHandlerError) as caught:
            await client.call("emit_events", {"events": events})
        assert (caught.value.code, caught.value.status_code) == ("INVALID_PARAMS", 400)
        assert caught.value.data["path"] == path
        assert caught.value.retryable is False
        assert await stored_ids(client) == []


# -- the pair -----------------------------------------------------------------


@contextlib.contextmanager
def pair_on(root: Path, assistant_state: Path, gateway_state: Path) -> Iterator[Pair]:
    with Pair(root, assistant_state=assistant_state, gateway_state=gateway_state) as both:
        yield both


async def contacts(gw: Client, count: int, prefix: str = "c") -> list[str]:
    return [
        (await gw.call("contacts_create", {"displayName": f"{prefix}{n}"}))["contact"]["id"]
        for n in range(count)
    ]


async def contact_ids_stored(assistant_socket: str) -> list[str]:
    async with Client(assistant_socket) as client:
        found = await client.call(
            "db_proxy",
            {
                "sql": "SELECT json_extract(payload, '$.contactId') AS c FROM events"
                " WHERE kind = 'contacts_changed' ORDER BY rowid",
                "mode": "query",
                "maxRows": 100_000,
            },
        )
    return [row["c"] for row in found["rows"]]


def dead_ids(gateway_db: Path) -> list[str]:
    db = apsw.Connection(str(gateway_db))
    try:
        return [str(row[0]) for row in db.execute("SELECT event_id FROM outbox_dead")]
    finally:
        db.close()


async def test_a_poison_event_in_the_middle_of_a_batch_alone_goes_to_outbox_dead(
    short_tmp: Path,
) -> None:
    with pair_on(short_tmp, short_tmp / "state", short_tmp / "state") as pair:
        assert pair.assistant.stop() == 0
        async with Client(pair.gateway_socket) as gw:
            before = await contacts(gw, 3, "before")
            db = apsw.Connection(str(pair.gateway_db))
            db.set_busy_timeout(5000)
            db.execute(
                "INSERT INTO outbox (event_id, kind, payload, created_at)"
                " VALUES ('ev_poison', 'bogus', '{}', 1)"
            )
            db.close()
            after = await contacts(gw, 3, "after")
            pair.assistant.restart()

            async def settled() -> bool:
                outbox = (await gw.call("health"))["outbox"]
                return bool(outbox["dead"] == 1 and outbox["pending"] == 0)

            await eventually(settled)
            health = await gw.call("health")
        assert await contact_ids_stored(pair.assistant_socket) == before + after
        assert dead_ids(pair.gateway_db) == ["ev_poison"]
        assert health["outbox"]["deliveredTotal"] == 6
        assert health["outbox"]["oldestAgeMs"] is None
        # The alert an operator gets (deploy/prometheus/), on this very moment's metrics.
        alerts = ["PairOutboxEventsDead", "PairAssistantLinkDown", "PairDaemonDown"]
        assert conditions_holding(metrics_of(pair), alerts) == ["PairOutboxEventsDead"]


async def test_a_gateway_killed_after_the_assistant_stored_a_batch_delivers_it_again_once(
    short_tmp: Path,
) -> None:
    with pair_on(short_tmp, short_tmp / "state", short_tmp / "state") as pair:
        assert pair.assistant.stop() == 0
        async with Client(pair.gateway_socket) as gw:
            ids = await contacts(gw, 20)
        with crash_at(pair.gateway, "after_emit_events"):
            pair.gateway.kill()
            pair.gateway.restart()
            pair.assistant.restart()
        assert await contact_ids_stored(pair.assistant_socket) == ids
        pair.gateway.restart()
        await gateway_health_reaches(pair.gateway_socket, outbox_drained)
        assert await contact_ids_stored(pair.assistant_socket) == ids


async def test_an_assistant_killed_in_the_middle_of_a_batch_stores_all_of_it_once_later(
    short_tmp: Path,
) -> None:
    with pair_on(short_tmp, short_tmp / "state", short_tmp / "state") as pair:
        assert pair.assistant.stop() == 0
        async with Client(pair.gateway_socket) as gw:
            ids = await contacts(gw, 20)
        with crash_at(pair.assistant, "mid_emit_events"):
            pair.assistant.start(wait=False)
        pair.assistant.restart()
        await gateway_health_reaches(pair.gateway_socket, outbox_drained)
        assert await contact_ids_stored(pair.assistant_socket) == ids


# -- full disks ---------------------------------------------------------------


@needs_root
async def test_a_full_assistant_disk_degrades_it_and_loses_no_event(short_tmp: Path) -> None:
    with (
        small_disk(short_tmp / "disk") as disk,
        pair_on(short_tmp, disk, short_tmp / "gstate") as pair,
    ):
        async with Client(pair.gateway_socket) as gw, Client(pair.assistant_socket) as assistant:
            await assistant.call("db_proxy", {"sql": "CREATE TABLE t (v BLOB)", "mode": "exec"})
            first = await contacts(gw, 1, "first")
            await gateway_health_reaches(pair.gateway_socket, outbox_drained)
            with disk_full(disk, disk / "assistant.db"):
                with pytest.raises(IpcHandlerError) as caught:
                    await assistant.call(
                        "db_proxy",
                        {"sql": "INSERT INTO t VALUES (zeroblob(100000))", "mode": "run"},
                    )
                assert (caught.value.code, caught.value.status_code) == ("DB_FULL", 507)
                assert caught.value.retryable is True
                health = await assistant.call("health")
                assert health["status"] == "degraded"
                assert "DB_FULL" in health["db"]["lastError"]
                degraded = conditions_holding(metrics_of(pair), ["PairDaemonDegraded"])
                assert degraded == ["PairDaemonDegraded"]
                during = await contacts(gw, 5, "during")

                async def refused_for_space() -> bool:
                    outbox = (await gw.call("health"))["outbox"]
                    return "DB_FULL" in (outbox["lastError"] or "")

                await eventually(refused_for_space)
            await gateway_health_reaches(pair.gateway_socket, outbox_drained, timeout=30)
            assert (await assistant.call("health"))["status"] == "ok"
            gateway_health = await gw.call("health")
        assert await contact_ids_stored(pair.assistant_socket) == first + during
        assert gateway_health["outbox"]["dead"] == 0
        assert dead_ids(pair.gateway_db) == []


@needs_root
async def test_a_full_gateway_disk_refuses_a_redemption_whole_then_it_succeeds(
    short_tmp: Path,
) -> None:
    with (
        small_disk(short_tmp / "disk") as disk,
        pair_on(short_tmp, short_tmp / "astate", disk) as pair,
    ):
        async with Client(pair.gateway_socket) as gw:
            contact = (await gw.call("contacts_create", {"displayName": "Kim"}))["contact"]
            created = await gw.call(
                "invites_create", {"contactId": contact["id"], "sourceChannel": "sms"}
            )
            redeem = {"sourceChannel": "sms", "code": created["code"], "externalUserId": "u1"}
            with disk_full(disk, pair.gateway_db):
                with pytest.raises(IpcHandlerError) as caught:
                    await gw.call("invites_redeem", redeem)
                assert (caught.value.code, caught.value.status_code) == ("DB_FULL", 507)
                assert caught.value.retryable is True
                # Reads sent together share one (empty) transaction on the
                # writer: they prove nothing about writes and clear nothing.
                lists = await asyncio.gather(*(gw.call("invites_list", {}) for _ in range(8)))
                assert [i["useCount"] for i in lists[0]["invites"]] == [0]
                health = await gw.call("health")
                assert health["status"] == "degraded"
                assert "DB_FULL" in health["db"]["lastError"]
            assert (await gw.call("invites_redeem", redeem))["outcome"] == "redeemed"
            assert (await gw.call("health"))["status"] == "ok"
        db = apsw.Connection(str(pair.gateway_db))
        try:
            assert count(db, "SELECT use_count FROM ingress_invites") == 1
        finally:
            db.close()


async def test_an_assistant_that_refuses_every_batch_alike_sets_no_event_aside(
    short_tmp: Path,
) -> None:
    """A gateway whose assistant has neither emit_events nor emit_event (its capabilities
    name neither; each call is METHOD_NOT_FOUND): its events wait, none set aside."""
    demo = DaemonProcess("tests.support.demo_server", short_tmp, short_tmp, "--log-level", "DEBUG")
    gateway = DaemonProcess(
        "gateway",
        short_tmp,
        short_tmp / "state",
        "--assistant-socket",
        str(short_tmp / "demo.sock"),
    )
    with demo, gateway:
        async with Client(str(short_tmp / "gateway.sock")) as gw:
            await contacts(gw, 1)

            async def refused_often() -> bool:
                # One event: each attempt is one call, refused whole.
                return demo.stderr().count("method='emit_event'") > DEAD_AFTER + 1

            await eventually(refused_often)
            outbox = (await gw.call("health"))["outbox"]
        assert (outbox["pending"], outbox["dead"]) == (1, 0)
        assert "METHOD_NOT_FOUND" in outbox["lastError"]
