"""What runs under the power cut, what it was told was done (its acknowledgements), and
what must be there after: every acknowledged call, each redemption's event once."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import anyio

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError, IpcTransportError

LEDGER = (
    "CREATE TABLE IF NOT EXISTS ledger (v INTEGER PRIMARY KEY);"
    " CREATE TABLE IF NOT EXISTS ledger2 (v INTEGER, k TEXT)"
)
CALL_TIMEOUT = 5.0


@dataclass
class Acks:
    """Every call the pair answered as done before the cut."""

    contacts: list[str] = field(default_factory=list)
    invites: dict[str, str] = field(default_factory=dict)
    redeemed: set[str] = field(default_factory=set)
    ledger: list[int] = field(default_factory=list)
    transactions: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"{len(self.contacts)} contacts, {len(self.invites)} invites,"
            f" {len(self.redeemed)} redemptions, {len(self.ledger)} db_proxy writes,"
            f" {len(self.transactions)} transactions"
        )


async def load(gateway: str, assistant: str, acks: Acks, rng: random.Random) -> None:
    """Contacts, invites, redemptions, db_proxy writes and transactions until the pair
    stops answering (the cut)."""
    with anyio.CancelScope():
        async with (
            Client(gateway, timeout=CALL_TIMEOUT) as gw,
            Client(assistant, timeout=CALL_TIMEOUT) as asst,
        ):
            step = 0
            try:
                await asst.call("db_proxy", {"sql": LEDGER, "mode": "exec"})
                while True:
                    step += 1
                    await _step(gw, asst, acks, rng, step)
            except (IpcTransportError, IpcHandlerError):
                return


async def _step(gw: Client, asst: Client, acks: Acks, rng: random.Random, step: int) -> None:
    contact = (await gw.call("contacts_create", {"displayName": f"c{step}"}))["contact"]["id"]
    acks.contacts.append(contact)
    created = await gw.call("invites_create", {"contactId": contact, "sourceChannel": "sms"})
    acks.invites[created["invite"]["id"]] = created["code"]
    open_invites = [i for i in acks.invites if i not in acks.redeemed]
    if open_invites and rng.random() < 0.6:
        invite = rng.choice(open_invites)
        redeem = {
            "sourceChannel": "sms",
            "code": acks.invites[invite],
            "externalUserId": f"u{step}",
        }
        if (await gw.call("invites_redeem", redeem))["outcome"] == "redeemed":
            acks.redeemed.add(invite)
    insert = {"sql": "INSERT INTO ledger (v) VALUES (:v)", "mode": "run", "bind": {"v": step}}
    await asst.call("db_proxy", insert)
    acks.ledger.append(step)
    key = f"k{step}"
    steps = [{"sql": "INSERT INTO ledger2 (v, k) VALUES (:v, :k)", "bind": {"v": step, "k": key}}]
    await asst.call("db_proxy_transaction", {"steps": steps, "idempotencyKey": key})
    acks.transactions[key] = step


async def check(gateway: str, assistant: str, acks: Acks) -> list[str]:
    """What of `acks` is not there after the cut, and each redemption's event not once."""
    async with Client(gateway) as gw, Client(assistant) as asst:
        problems = []
        for part in (
            _check_gateway(gw, acks),
            _check_assistant(asst, acks),
            _check_events(gw, asst),
        ):
            try:
                problems += await part
            except IpcHandlerError as exc:
                problems.append(f"{exc.code}: {exc.message} (what was acknowledged is not there)")
    return problems


async def _check_gateway(gw: Client, acks: Acks) -> list[str]:
    problems = []
    contacts = {c["id"] for c in await _all(gw, "contacts_list", "contacts")}
    problems += [f"acknowledged contact {c} lost" for c in acks.contacts if c not in contacts]
    invites = {i["id"]: i for i in await _all(gw, "invites_list", "invites")}
    for invite, code in acks.invites.items():
        if invite not in invites:
            problems.append(f"acknowledged invite {invite} lost")
        elif invite in acks.redeemed and invites[invite]["useCount"] < 1:
            problems.append(f"acknowledged redemption of {invite} lost")
        elif invites[invite]["status"] == "active":
            redeem = {"sourceChannel": "sms", "code": code, "externalUserId": f"after-{invite}"}
            outcome = (await gw.call("invites_redeem", redeem))["outcome"]
            if outcome != "redeemed":
                problems.append(f"invite {invite} from before the cut no longer redeems: {outcome}")
    return problems


async def _check_assistant(asst: Client, acks: Acks) -> list[str]:
    if not acks.ledger and not acks.transactions:
        return []  # the cut may have come before the tables were made
    problems = []
    found = {row["v"] for row in await _rows(asst, "SELECT v FROM ledger")}
    problems += [f"acknowledged db_proxy write v={v} lost" for v in acks.ledger if v not in found]
    for key, value in acks.transactions.items():
        steps = [
            {"sql": "INSERT INTO ledger2 (v, k) VALUES (:v, :k)", "bind": {"v": value, "k": key}}
        ]
        await asst.call("db_proxy_transaction", {"steps": steps, "idempotencyKey": key})
        rows = await _rows(asst, f"SELECT count(*) AS n FROM ledger2 WHERE k = '{key}'")
        if rows[0]["n"] != 1:
            problems.append(f"acknowledged transaction {key} is there {rows[0]['n']} times")
    return problems


async def _check_events(gw: Client, asst: Client) -> list[str]:
    """Each redemption and each contact the gateway holds has its event once, and the
    assistant holds no event of one the gateway does not have."""
    await _drained(gw)
    redeemed = {i["id"] for i in await _all(gw, "invites_list", "invites") if i["useCount"] > 0}
    contacts = {c["id"] for c in await _all(gw, "contacts_list", "contacts")}
    problems = []
    for kind, member, held in (("invite_redeemed", "inviteId", redeemed),
                               ("contacts_changed", "contactId", contacts)):  # fmt: skip
        sql = (
            f"SELECT json_extract(payload, '$.{member}') AS id, count(*) AS n FROM events"
            f" WHERE kind = '{kind}' GROUP BY 1"
        )
        events = {row["id"]: row["n"] for row in await _rows(asst, sql)}
        problems += [f"{kind} {i}: {events.get(i, 0)} events" for i in held if events.get(i) != 1]
        problems += [
            f"{kind} event for {i}, which the gateway does not have"
            for i in events
            if i not in held
        ]
    return problems


async def _drained(gw: Client) -> None:
    with anyio.fail_after(30):
        while (await gw.call("health"))["outbox"]["pending"]:
            await anyio.sleep(0.05)


async def _all(client: Client, method: str, member: str) -> list[Any]:
    found: list[Any] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = await client.call(method, params)
        found += page[member]
        cursor = page.get("nextCursor")
        if not cursor:
            return found


async def _rows(asst: Client, sql: str) -> list[dict[str, Any]]:
    answer = await asst.call("db_proxy", {"sql": sql, "mode": "query", "maxRows": 100000})
    rows: list[dict[str, Any]] = answer["rows"]
    return rows
