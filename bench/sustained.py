"""Sustained redemptions (SPEC.md section 8): does the outbox keep up with the gateway?

64 `invites_redeem` calls in flight on fresh invites for `SECONDS`, the
assistant up: redemptions/s, events delivered/s during the run (from
`health.outbox.deliveredTotal`), the backlog at the end and the time to drain
it. Then delivery alone: `QUEUED` events put in the outbox while both
daemons are down, and the time the gateway takes to deliver them to an idle
assistant. Rates are also given as ratios to a floor run made just before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

from pair.protocol.client import Client

SECONDS = 20.0
QUEUED = 100_000
USES = 1000
IN_FLIGHT = 64
POLL = 0.01


@dataclass
class Sustained:
    seconds: float
    floor_calls_per_s: float
    redemptions_per_s: float
    delivered_per_s: float
    backlog_at_end: int
    backlog_seconds_of_redemptions: float
    drain_seconds: float
    delivery_alone_per_s: float = 0.0

    def lines(self) -> list[str]:
        floor = self.floor_calls_per_s
        return [
            f"sustained redemptions, {IN_FLIGHT} in flight for {self.seconds:.0f} s"
            f" (floor {floor:,.0f}/s):",
            f"  redemptions/s          {self.redemptions_per_s:9,.0f}"
            f"  ({self.redemptions_per_s / floor:.2f}x floor)",
            f"  events delivered/s     {self.delivered_per_s:9,.0f}"
            f"  ({self.delivered_per_s / floor:.2f}x floor,"
            f" {self.delivered_per_s / self.redemptions_per_s:.2f}x the redemptions)",
            f"  backlog at the end     {self.backlog_at_end:9,}"
            f"  ({self.backlog_seconds_of_redemptions:.2f} s of redemptions)",
            f"  drain time             {self.drain_seconds:9.2f} s",
            f"  delivery alone/s       {self.delivery_alone_per_s:9,.0f}"
            f"  ({self.delivery_alone_per_s / floor:.2f}x floor,"
            f" {self.delivery_alone_per_s / self.redemptions_per_s:.2f}x the redemptions;"
            f" {QUEUED:,} queued, assistant idle)",
        ]


async def fresh_codes(client: Client, count: int) -> list[str]:
    contact = (await client.call("contacts_create", {"displayName": "Sustained"}))["contact"]
    codes: list[str] = []
    for _ in range(count // USES + 1):
        created = await client.call(
            "invites_create",
            {"contactId": contact["id"], "sourceChannel": "sustained", "maxUses": USES},
        )
        codes += [created["code"]] * USES
    return codes


async def outbox(client: Client) -> dict[str, Any]:
    health = await client.call("health")
    return dict(health["outbox"])


async def drained(client: Client) -> float:
    """Seconds until the outbox is empty (the gateway is another process: polled)."""
    started = time.perf_counter()
    while True:
        if not (await outbox(client))["pending"]:
            return time.perf_counter() - started
        await asyncio.sleep(POLL)


async def run_sustained(
    client: Client, floor_rate: Callable[[], Awaitable[float]], expected_rate: float
) -> Sustained:
    codes = iter(await fresh_codes(client, int(expected_rate * SECONDS * 1.5) + USES))
    senders = iter(range(1 << 62))
    await drained(client)
    floor = await floor_rate()
    before = (await outbox(client))["deliveredTotal"]
    done = 0
    deadline = time.perf_counter() + SECONDS

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            params = {
                "sourceChannel": "sustained",
                "code": next(codes),
                "externalUserId": f"s{next(senders)}",
            }
            await client.call("invites_redeem", params)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    elapsed = time.perf_counter() - started
    end = await outbox(client)
    redemption_rate = done / elapsed
    return Sustained(
        seconds=SECONDS,
        floor_calls_per_s=floor,
        redemptions_per_s=redemption_rate,
        delivered_per_s=(end["deliveredTotal"] - before) / elapsed,
        backlog_at_end=end["pending"],
        backlog_seconds_of_redemptions=end["pending"] / redemption_rate,
        drain_seconds=await drained(client),
    )


def queue_events(gateway_db: Path, count: int) -> None:
    """Put `count` events in the outbox directly, as many redemptions would have."""
    db = apsw.Connection(str(gateway_db))
    db.set_busy_timeout(5000)
    now = int(time.time() * 1000)
    payload = '{"inviteId":"inv_x","contactId":"ct_x","channelId":"ch_x","sourceChannel":"bench"}'
    with db:
        db.executemany(
            "INSERT INTO outbox (event_id, kind, payload, created_at) VALUES (?, ?, ?, ?)",
            ((f"ev_alone_{n}", "invite_redeemed", payload, now) for n in range(count)),
        )
    db.close()


async def delivery_alone(gateway_socket: str) -> float:
    """Events/s while the gateway delivers a queued backlog to an idle assistant."""
    async with Client(gateway_socket) as client:
        start = await outbox(client)
        elapsed = await drained(client)
        end = await outbox(client)
    return float(end["deliveredTotal"] - start["deliveredTotal"]) / elapsed
