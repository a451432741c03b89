"""Another process holds a daemon's database lock: callers hear DB_BUSY, the daemon stays up.

A backup tool, an operator's sqlite3 shell or a migration script can hold
the write lock of assistant.db or gateway.db for a while. Upkeep (sweeps)
and the outbox must wait it out, never exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import apsw
import pytest

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError
from pair.testing import Pair
from pair.testing.daemons import DaemonProcess
from tests.support.waiting import eventually, gateway_health_reaches, outbox_drained

pytestmark = pytest.mark.anyio

BUSY = ("--busy-timeout-ms", "100")


@contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Hold `path`'s write lock, as another process's open write transaction does."""
    db = apsw.Connection(str(path))
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


async def logged(daemon: DaemonProcess, text: str) -> None:
    async def found() -> bool:
        return text in daemon.stderr()

    await eventually(found)


@pytest.mark.parametrize(
    ("module", "database", "sweep"),
    [
        ("assistant", "assistant.db", "the idempotency key sweep failed"),
        ("gateway", "gateway.db", "the invite sweep failed"),
    ],
)
async def test_a_lock_held_at_start_up_skips_a_sweep_and_the_daemon_serves_on(
    short_tmp: Path, module: str, database: str, sweep: str
) -> None:
    (short_tmp / "run").mkdir()
    with DaemonProcess(module, short_tmp / "run", short_tmp / "state", *BUSY) as daemon:
        assert daemon.stop() == 0
        with write_lock(short_tmp / "state" / database):
            daemon.restart()
            await logged(daemon, sweep)
            async with Client(str(short_tmp / "run" / f"{module}.sock")) as client:
                assert (await client.call("health"))["pid"] == daemon.pid
        assert daemon.stop() == 0
    assert "database is locked" in daemon.stderr()


async def test_delivery_waits_out_a_locked_gateway_db_and_stores_each_event_once(
    short_tmp: Path,
) -> None:
    """The assistant takes events while gateway.db cannot record that it did."""
    pair = Pair(short_tmp, gateway_args=BUSY)
    with pair.checked():
        pair.assistant.start()
        pair.gateway.start()
        assert pair.assistant.stop() == 0
        async with Client(pair.gateway_socket) as gw:
            ids = [
                (await gw.call("contacts_create", {"displayName": f"c{n}"}))["contact"]["id"]
                for n in range(3)
            ]
            with write_lock(pair.state / "gateway.db"):
                with pytest.raises(IpcHandlerError) as caught:
                    await gw.call("contacts_create", {"displayName": "refused"})
                assert (caught.value.code, caught.value.retryable) == ("DB_BUSY", True)
                pair.assistant.restart()
                await logged(pair.gateway, "outbox delivery paused: gateway.db: database is locked")
                health = await gw.call("health")
                assert health["outbox"]["pending"] == 3
                assert "gateway.db" in health["outbox"]["lastError"]
            await gateway_health_reaches(pair.gateway_socket, outbox_drained)
        async with Client(pair.assistant_socket) as assistant:
            stored = await assistant.call(
                "db_proxy",
                {
                    "sql": "SELECT json_extract(payload, '$.contactId') AS contact FROM events"
                    " WHERE kind = 'contacts_changed' ORDER BY rowid",
                    "mode": "query",
                },
            )
        assert [row["contact"] for row in stored["rows"]] == ids
        assert pair.gateway.stop() == 0
