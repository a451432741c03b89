"""Bad input to gatewayd gets its precise error and writes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError
from pair.testing import Pair

pytestmark = pytest.mark.anyio


@pytest.fixture
async def gw(shared_pair: Pair) -> Any:
    async with Client(shared_pair.gateway_socket) as client:
        listed = (await client.call("contacts_list", {}))["contacts"]
        if listed:
            client.contact_id = listed[0]["id"]  # type: ignore[attr-defined]
        else:
            contact = await client.call("contacts_create", {"displayName": "Alice"})
            client.contact_id = contact["contact"]["id"]  # type: ignore[attr-defined]
        yield client


def invite(**fields: Any) -> tuple[str, dict[str, Any]]:
    return "invites_create", {"contactId": "CONTACT", "sourceChannel": "telegram", **fields}


def redeem(**fields: Any) -> tuple[str, dict[str, Any]]:
    return "invites_redeem", {"sourceChannel": "telegram", "externalUserId": "u1", **fields}


CASES = [
    (invite(contactId="ct_missing"), "NOT_FOUND", 404, None),
    (invite(sourceChannel="Telegram"), "INVALID_PARAMS", 400, "$.sourceChannel"),
    (invite(sourceChannel=""), "INVALID_PARAMS", 400, "$.sourceChannel"),
    (invite(sourceChannel="x" * 33), "INVALID_PARAMS", 400, "$.sourceChannel"),
    (invite(sourceChannel="tele gram"), "INVALID_PARAMS", 400, "$.sourceChannel"),
    (invite(sourceChannel="telegram\n"), "INVALID_PARAMS", 400, "$.sourceChannel"),
    (invite(maxUses=0), "INVALID_PARAMS", 400, "$.maxUses"),
    (invite(maxUses=-1), "INVALID_PARAMS", 400, "$.maxUses"),
    (invite(maxUses=1001), "INVALID_PARAMS", 400, "$.maxUses"),
    (invite(maxUses="2"), "INVALID_PARAMS", 400, "$.maxUses"),
    (invite(ttlSeconds=0), "INVALID_PARAMS", 400, "$.ttlSeconds"),
    (invite(ttlSeconds=30 * 86400 + 1), "INVALID_PARAMS", 400, "$.ttlSeconds"),
    (invite(note="n" * 1001), "INVALID_PARAMS", 400, "$.note"),
    (invite(code="123456"), "INVALID_PARAMS", 400, "$.code"),
    (("invites_create", {"sourceChannel": "telegram"}), "INVALID_PARAMS", 400, "$.contactId"),
    (redeem(code="12345"), "INVALID_PARAMS", 400, "$.code"),
    (redeem(code="1234567"), "INVALID_PARAMS", 400, "$.code"),
    (redeem(code="12a456"), "INVALID_PARAMS", 400, "$.code"),
    (redeem(code="123456\n"), "INVALID_PARAMS", 400, "$.code"),
    (redeem(code=123456), "INVALID_PARAMS", 400, "$.code"),
    (redeem(code="123456", externalUserId=""), "INVALID_PARAMS", 400, "$.externalUserId"),
    (redeem(code="123456", sourceChannel="SMS!"), "INVALID_PARAMS", 400, "$.sourceChannel"),
    (("contacts_create", {"displayName": ""}), "INVALID_PARAMS", 400, "$.displayName"),
    (("contacts_create", {"displayName": "x" * 201}), "INVALID_PARAMS", 400, "$.displayName"),
    (("contacts_create", {"displayName": "A", "role": "Admin!"}), "INVALID_PARAMS", 400, "$.role"),
    (("contacts_create", {"displayName": "A", "role": "admin\n"}), "INVALID_PARAMS", 400, "$.role"),
    (("contacts_create", {"name": "A"}), "INVALID_PARAMS", 400, "$.name"),
    (("contacts_list", {"limit": 0}), "INVALID_PARAMS", 400, "$.limit"),
    (("contacts_list", {"cursor": "%%%"}), "INVALID_PARAMS", 400, "$.cursor"),
    (("invites_list", {"status": "gone"}), "INVALID_PARAMS", 400, "$.status"),
    (("contacts_get", {"id": "ct_missing"}), "NOT_FOUND", 404, None),
    (("invites_revoke", {}), "INVALID_PARAMS", 400, "$.id"),
    (
        ("channel_inbound", {"sourceChannel": "telegram", "text": "123456"}),
        "INVALID_PARAMS",
        400,
        "$.externalUserId",
    ),
]


async def state(gw: Client) -> Any:
    return (
        await gw.call("contacts_list", {}),
        await gw.call("invites_list", {}),
        await gw.call("contacts_get", {"id": gw.contact_id}),  # type: ignore[attr-defined]
    )


@pytest.mark.parametrize(("call", "code", "status", "path"), CASES)
async def test_bad_input_is_refused_precisely_and_writes_nothing(
    gw: Client, call: tuple[str, dict[str, Any]], code: str, status: int, path: str | None
) -> None:
    method, params = call
    if params.get("contactId") == "CONTACT":
        params = {**params, "contactId": gw.contact_id}  # type: ignore[attr-defined]
    before = await state(gw)
    with pytest.raises(IpcHandlerError) as caught:
        await gw.call(method, params)
    assert (caught.value.code, caught.value.status_code) == (code, status), caught.value.message
    if path is not None:
        assert caught.value.data["path"] == path
    assert await state(gw) == before
