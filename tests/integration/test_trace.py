"""One trace across the hop: a redemption, its event's delivery and its storing, in both
daemons' JSON logs under the same trace id, through a restart of the gateway between."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError
from pair.testing import Pair
from tests.support.ctl import pairctl
from tests.support.waiting import gateway_health_reaches, outbox_drained, until

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


def json_pair(root: Path) -> Pair:
    """Both daemons logging JSON lines to their stderr files."""
    return Pair(root, ("--log-format", "json"), assistant_args=("--log-format", "json"))


def lines_of(log: str, trace_id: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [entry for entry in entries if entry.get("trace_id") == trace_id]


async def redeem(client: Client, channel: str, user: str, meta: dict[str, str] | None) -> Any:
    contact = (await client.call("contacts_create", {"displayName": user}))["contact"]["id"]
    invite = await client.call("invites_create", {"contactId": contact, "sourceChannel": channel})
    params: dict[str, Any] = {
        "sourceChannel": channel,
        "code": invite["code"],
        "externalUserId": user,
    }
    if meta is not None:
        params["_meta"] = meta
    return await client.call("invites_redeem", params)


async def test_a_redemption_its_delivery_and_its_storing_log_under_the_callers_trace(
    short_tmp: Path,
) -> None:
    with json_pair(short_tmp).start().checked() as pair:
        async with Client(pair.gateway_socket) as client:
            # Queued while the assistant is away, delivered by a restarted gateway: the
            # outbox row, not the process, keeps the trace.
            pair.assistant.stop()
            redeemed = await redeem(client, "sms", "ada", {"traceparent": TRACEPARENT})
        pair.gateway.stop()
        pair.assistant.start()
        pair.gateway.start()
        await gateway_health_reaches(pair.gateway_socket, outbox_drained)
    gateway = lines_of(pair.gateway.stderr(), TRACE_ID)
    assistant = lines_of(pair.assistant.stderr(), TRACE_ID)
    said = [entry["msg"] for entry in gateway]
    invite = redeemed["inviteId"]
    assert any(m.startswith(f"invite {invite} redeemed: contact") for m in said), said
    delivered = [m for m in said if re.fullmatch(r"event ev_\w+ \(invite_redeemed\) delivered", m)]
    assert len(delivered) == 1, said
    event_id = delivered[0].split()[1]
    assert TRACE_ID in event_id
    assert [entry["msg"] for entry in assistant] == [f"event {event_id} (invite_redeemed) stored"]
    # Each daemon's part is a span of its own, none the caller's.
    spans = {entry["span_id"] for entry in gateway + assistant}
    assert len(spans) == 3
    assert CALLER_SPAN not in spans


async def test_a_call_without_trace_context_starts_one_that_its_event_keeps(
    short_tmp: Path,
) -> None:
    with json_pair(short_tmp).start().checked() as pair:
        async with Client(pair.gateway_socket) as client:
            redeemed = await redeem(client, "tg", "bo", None)
        await gateway_health_reaches(pair.gateway_socket, outbox_drained)
        line = next(
            json.loads(line)
            for line in pair.gateway.stderr().splitlines()
            if f"invite {redeemed['inviteId']} redeemed" in line
        )
        trace_id = line["trace_id"]
        assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
        stored = lines_of(pair.assistant.stderr(), trace_id)
        assert [entry["msg"].split()[2:] for entry in stored] == [["(invite_redeemed)", "stored"]]


async def test_malformed_trace_context_is_refused_and_changes_nothing(pair: Pair) -> None:
    async with Client(pair.gateway_socket) as client:
        before = await client.call("contacts_list", {})
        with pytest.raises(IpcHandlerError) as caught:
            await client.call(
                "contacts_create",
                {"displayName": "x", "_meta": {"traceparent": "00-abc-def-01"}},
            )
        assert caught.value.code == "INVALID_PARAMS"
        assert caught.value.data["path"] == "$._meta.traceparent"
        assert "W3C traceparent" in caught.value.message
        assert await client.call("contacts_list", {}) == before


def test_pairctl_trace_prints_the_id_the_daemons_log_under(short_tmp: Path) -> None:
    with json_pair(short_tmp).start().checked() as pair:
        result = pairctl(pair, "--trace", "contact", "create", "Cy")
        assert result.returncode == 0, result.stderr
        found = re.search(r"trace ([0-9a-f]{32}): journalctl TRACE_ID=\1", result.stderr)
        assert found is not None, result.stderr

        def logged() -> list[str]:
            return [entry["msg"] for entry in lines_of(pair.gateway.stderr(), found[1])]

        until(lambda: len(logged()) == 2, "the contact's event delivered")
        created, delivered = logged()
        assert re.fullmatch(r"contact \w+ created", created)
        assert re.fullmatch(r"event ev_\w+ \(contacts_changed\) delivered", delivered)
        refused = pairctl(pair, "--trace", "status")
        assert refused.returncode == 2
        assert "--trace is for one call" in refused.stderr
