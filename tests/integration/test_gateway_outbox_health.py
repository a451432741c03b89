"""`health.outbox.pending` against what really waits in the gateway's outbox (SPEC.md section 4)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import apsw
import pytest

from pair.protocol.client import Client
from pair.testing import Pair
from tests.support.sqlite import count
from tests.support.waiting import gateway_health_reaches

pytestmark = pytest.mark.anyio

ROUNDS = 2000


@contextmanager
def outbox_table(pair: Pair) -> Iterator[apsw.Connection]:
    db = apsw.Connection(str(pair.state / "gateway.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        yield db
    finally:
        db.close()


def waiting(db: apsw.Connection) -> int:
    return count(db, "SELECT count(*) FROM outbox")


async def test_pending_never_reports_fewer_events_than_wait_while_commits_and_deliveries_race(
    pair: Pair,
) -> None:
    """One writer commits events while delivery runs; after each commit, health, then the table.

    Between the two reads only deliveries happen (rows only go), so the rows
    still there were waiting when health was read and must all be counted.
    """
    undercounts = []
    with outbox_table(pair) as db:
        async with Client(pair.gateway_socket) as gw:
            for n in range(ROUNDS):
                await gw.call("contacts_create", {"displayName": f"c{n}"})
                pending = (await gw.call("health"))["outbox"]["pending"]
                rows = waiting(db)
                if pending < rows:
                    undercounts.append((n, pending, rows))
    assert undercounts == []


async def test_pending_is_the_table_exactly_once_delivery_stops(pair: Pair) -> None:
    """Events committed while delivery runs, then the assistant goes away: health is exact."""
    async with Client(pair.gateway_socket) as gw:

        async def writer(index: int) -> None:
            for n in range(50):
                await gw.call("contacts_create", {"displayName": f"w{index}-{n}"})

        async with anyio.create_task_group() as group:
            for index in range(8):
                group.start_soon(writer, index)
            await anyio.sleep(0)
            assert pair.assistant.stop() == 0

    def delivery_stopped(health: dict[str, object]) -> bool:
        # A failed attempt after the assistant left: nothing is mid-delivery now.
        outbox = health["outbox"]
        assert isinstance(outbox, dict)
        return outbox["pending"] == 0 or outbox["lastError"] is not None

    await gateway_health_reaches(pair.gateway_socket, delivery_stopped)
    async with Client(pair.gateway_socket) as gw:
        health = await gw.call("health")
    with outbox_table(pair) as db:
        assert health["outbox"]["pending"] == waiting(db)
