"""The gateway's strict link: SQL failures are handler errors, never "assistant not ready"."""

from __future__ import annotations

from pathlib import Path

import pytest

from pair.gateway.link import AssistantLink
from pair.protocol.errors import IpcHandlerError, IpcTransportError
from pair.testing.daemons import DaemonProcess

pytestmark = pytest.mark.anyio


async def test_the_helpers_return_results_and_raise_sql_failures_as_handler_errors(
    assistant: DaemonProcess, assistant_socket: str
) -> None:
    link = AssistantLink(assistant_socket)
    try:
        create = {"sql": "CREATE TABLE t (id INTEGER PRIMARY KEY)", "mode": "exec"}
        await link.call_assistant("db_proxy", create)
        insert = {"sql": "INSERT INTO t (id) VALUES (?)", "mode": "run", "bind": [1]}
        inserted = await link.call_assistant("db_proxy", insert)
        assert inserted == {"changes": 1, "lastInsertRowid": 1}
        assert (await link.assistant_db_query("SELECT id FROM t"))["rows"] == [{"id": 1}]
        with pytest.raises(IpcHandlerError) as caught:
            await link.assistant_db_transaction(
                [
                    {"sql": "INSERT INTO t (id) VALUES (2)"},
                    {"sql": "INSERT INTO t (id) VALUES (1)"},
                ],
                idempotency_key="k",
            )
        assert caught.value.code == "DB_PROXY_TRANSACTION_FAILED"
        assert "UNIQUE constraint failed: t.id" in caught.value.message
        assert link.status.state == "connected"
        assert (await link.assistant_db_query("SELECT count(*) AS n FROM t"))["rows"] == [{"n": 1}]
    finally:
        await link.aclose()


async def test_an_absent_assistant_is_a_transport_error_and_marks_the_link_down(
    short_tmp: Path,
) -> None:
    link = AssistantLink(str(short_tmp / "assistant.sock"))
    try:
        with pytest.raises(IpcTransportError) as caught:
            await link.assistant_db_query("SELECT 1")
        assert caught.value.sent is False
        assert link.status.state == "down"
        assert link.status.last_error is not None
    finally:
        await link.aclose()
