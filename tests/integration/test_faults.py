"""The fault suite: what production does to the real processes, and what must hold after.

The short versions run in `make test`; `make soak` runs the same scenarios
longer (PAIR_SOAK_ROUNDS rounds) and prints what they did.
"""

from __future__ import annotations

import functools
import json
import os
import random
import resource
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import apsw
import pytest

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError, IpcTransportError
from pair.testing import Pair
from pair.testing.daemons import DaemonProcess
from tests.support.proc import vm_kib
from tests.support.sqlite import count
from tests.support.waiting import (
    eventually,
    gateway_health_reaches,
    outbox_drained,
)

pytestmark = pytest.mark.anyio

SOAK_ROUNDS = int(os.environ.get("PAIR_SOAK_ROUNDS", "0"))


def rounds(short: int) -> int:
    return SOAK_ROUNDS or short


def report(name: str, counts: dict[str, int] | Counter[str]) -> None:
    print(f"\n[fault suite] {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


def held_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4096)
    return sock


async def test_restarting_the_gateway_under_load_refuses_no_connection(short_tmp: Path) -> None:
    """Play systemd: hold the socket, kill and restart the daemon while clients call."""
    both = Pair(short_tmp)
    listener = held_socket(both.runtime / "gateway.sock")
    both.gateway = DaemonProcess(
        "gateway", both.runtime, both.state, inherit=(listener.fileno(), "gateway.sock")
    )
    outcomes: Counter[str] = Counter()
    restarts = rounds(4)
    try:
        with both:
            await _restarts_under_load(both, restarts, outcomes)
    finally:
        listener.close()
    report("restarts under load", outcomes)
    assert not [key for key in outcomes if key.startswith("not sent")], outcomes
    assert set(outcomes) <= {"ok", "sent", "SHUTTING_DOWN", "restarts"}, outcomes
    assert outcomes["ok"] > restarts


async def _restarts_under_load(both: Pair, restarts: int, outcomes: Counter[str]) -> None:
    """Six callers (fresh and persistent clients) while the gateway is killed or stopped
    and started again `restarts` times."""
    stop = anyio.Event()

    async def caller(fresh: bool) -> None:
        persistent = Client(both.gateway_socket, timeout=15)
        while not stop.is_set():
            client = Client(both.gateway_socket, timeout=15) if fresh else persistent
            try:
                await client.call("contacts_list", {"limit": 1})
                outcomes["ok"] += 1
            except IpcHandlerError as exc:
                outcomes[exc.code] += 1
            except IpcTransportError as exc:
                outcomes["sent" if exc.sent else f"not sent: {exc.message}"] += 1
            finally:
                if fresh:
                    await client.aclose()
        await persistent.aclose()

    async with anyio.create_task_group() as task_group:
        for n in range(6):
            task_group.start_soon(caller, n % 2 == 0)
        for round_number in range(restarts):
            await anyio.sleep(0.3)
            kill = round_number % 2 == 0
            if kill:
                both.gateway.kill()
            else:
                assert await anyio.to_thread.run_sync(both.gateway.stop) == 0
            before = outcomes["ok"]
            await anyio.to_thread.run_sync(both.gateway.restart)
            outcomes["restarts"] += 1
            await eventually(functools.partial(_more, outcomes, before))
        stop.set()


async def _more(outcomes: Counter[str], before: int) -> bool:
    return outcomes["ok"] > before


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(wanted, soft)), hard))


async def test_hostile_clients_leave_well_behaved_ones_untouched(pair: Pair) -> None:
    raise_fd_limit(4096)
    path = pair.gateway_socket
    rng = random.Random(5)
    rss_before = vm_kib(pair.gateway.pid, "VmRSS")
    idle: list[socket.socket] = []
    counts: Counter[str] = Counter()
    valid = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "health"}).encode()
    try:
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            idle.append(sock)
        counts["idle connections"] = len(idle)
        hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hog.connect(path)
        hog.setblocking(False)
        idle.append(hog)

        def hostile() -> None:
            body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "contacts_list", "params": {}})
            flood = struct.pack(">I", len(body)) + body.encode()
            for _ in range(5000):
                try:
                    hog.send(flood)
                    counts["unread requests"] += 1
                except BlockingIOError:
                    break
            for _ in range(200):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(2)
                    sock.connect(path)
                    kind = rng.random()
                    if kind < 0.3:
                        sock.sendall(rng.randbytes(rng.randint(1, 40)))
                        counts["garbage"] += 1
                    elif kind < 0.7:
                        mutated = bytearray(valid)
                        mutated[rng.randrange(len(mutated))] = rng.randrange(256)
                        sock.sendall(struct.pack(">I", len(mutated)) + bytes(mutated))
                        counts["mutated"] += 1
                    else:
                        sock.sendall(struct.pack(">I", 1000) + valid[:10])
                        counts["half frames"] += 1
            counts["huge lengths"] += 1
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                sock.sendall(b"\xff\xff\xff\xff")

        good_calls = 0
        async with Client(path) as good, anyio.create_task_group() as task_group:
            task_group.start_soon(anyio.to_thread.run_sync, hostile)
            for _ in range(500):
                assert (await good.call("health"))["status"] == "ok"
                good_calls += 1
        counts["well-behaved calls"] = good_calls
        growth_mib = (vm_kib(pair.gateway.pid, "VmRSS") - rss_before) / 1024
        counts["rss growth MiB"] = round(growth_mib)
        assert growth_mib < 64
        async with Client(path) as after:
            assert (await after.call("health"))["status"] == "ok"
    finally:
        for sock in idle:
            sock.close()
    report("hostile clients", counts)


async def test_random_kills_of_both_sides_lose_and_duplicate_nothing(pair: Pair) -> None:
    """SIGKILL either daemon at random moments during redemptions and idempotent transactions."""
    rng = random.Random(11)
    counts: Counter[str] = Counter()
    async with Client(pair.gateway_socket) as gw:
        contact = (await gw.call("contacts_create", {"displayName": "Load"}))["contact"]["id"]
        created = await gw.call(
            "invites_create", {"contactId": contact, "sourceChannel": "sms", "maxUses": 1000}
        )
    code = created["code"]
    # A round sends a few hundred redemptions; past 1000 uses the redeemers stop.
    async with Client(pair.assistant_socket) as assistant:
        await assistant.call(
            "db_proxy", {"sql": "CREATE TABLE ledger (k TEXT, v INTEGER)", "mode": "exec"}
        )
    unsure_tx: set[int] = set()
    done_tx: set[int] = set()
    acknowledged: set[str] = set()
    sequence = iter(range(1 << 30))

    def tx_params(n: int) -> dict[str, Any]:
        step = {"sql": "INSERT INTO ledger (k, v) VALUES (?, ?)", "bind": [f"tx-{n}", n]}
        return {"steps": [step, step], "idempotencyKey": f"ledger-{n}"}

    async def redeemer(stop: anyio.Event) -> None:
        while not stop.is_set():
            sender = f"r{next(sequence)}"
            try:
                async with Client(pair.gateway_socket, timeout=10) as client:
                    await client.call(
                        "invites_redeem",
                        {"sourceChannel": "sms", "code": code, "externalUserId": sender},
                    )
                acknowledged.add(sender)
            except IpcTransportError:
                counts["redeem transport errors"] += 1
                await anyio.sleep(0.05)
            except IpcHandlerError as exc:
                assert exc.code == "INVITE_EXHAUSTED", exc  # noqa: PT017 - any other code is a bug
                return

    async def transactor(stop: anyio.Event) -> None:
        while not stop.is_set():
            n = next(sequence)
            try:
                async with Client(pair.assistant_socket, timeout=10) as client:
                    await client.call("db_proxy_transaction", tx_params(n))
                done_tx.add(n)
            except IpcTransportError:
                unsure_tx.add(n)
                await anyio.sleep(0.05)

    for _ in range(rounds(3)):
        stop = anyio.Event()
        async with anyio.create_task_group() as task_group:
            for _ in range(2):
                task_group.start_soon(redeemer, stop)
                task_group.start_soon(transactor, stop)
            await anyio.sleep(rng.uniform(0.2, 0.6))
            victim = rng.choice([pair.gateway, pair.assistant])
            victim.kill()
            counts[f"killed {victim.module}"] += 1
            await anyio.sleep(rng.uniform(0.05, 0.3))
            await anyio.to_thread.run_sync(victim.restart)
            await anyio.sleep(0.3)
            stop.set()

    async with Client(pair.assistant_socket) as assistant:
        for n in sorted(unsure_tx - done_tx):
            assert (await assistant.call("db_proxy_transaction", tx_params(n)))["ok"] is True
        # Faster daemons make more calls per round than the default maxRows holds.
        ledger = await assistant.call(
            "db_proxy", {"sql": "SELECT k FROM ledger", "mode": "query", "maxRows": 1_000_000}
        )
    assert ledger["truncated"] is False
    per_key = Counter(row["k"] for row in ledger["rows"])
    assert all(n == 2 for n in per_key.values()), "a transaction applied twice or half"
    assert {f"tx-{n}" for n in done_tx | unsure_tx} == set(per_key)
    counts["transactions"] = len(per_key)

    async with Client(pair.gateway_socket) as gw:
        await gateway_health_reaches(pair.gateway_socket, outbox_drained, timeout=30)
    db = apsw.Connection(str(pair.state / "gateway.db"))
    uses = count(db, "SELECT use_count FROM ingress_invites")
    channels = {row[0] for row in db.execute("SELECT external_user_id FROM contact_channels")}
    db.close()
    assert uses == len(channels)
    assert acknowledged <= channels
    async with Client(pair.assistant_socket) as assistant:
        events = (
            await assistant.call(
                "db_proxy",
                {
                    "sql": "SELECT count(*) AS n,"
                    " count(DISTINCT json_extract(payload, '$.channelId')) AS channels"
                    " FROM events WHERE kind = 'invite_redeemed'",
                    "mode": "query",
                },
            )
        )["rows"][0]
    assert events == {"n": uses, "channels": uses}
    counts["redemptions"] = uses
    report("random kills", counts)


async def test_the_gateway_serves_invites_through_an_assistant_outage(pair: Pair) -> None:
    outage = 60.0 if SOAK_ROUNDS else 3.0
    counts: Counter[str] = Counter()
    async with Client(pair.gateway_socket) as gw:
        contact = (await gw.call("contacts_create", {"displayName": "Outage"}))["contact"]["id"]
        # Its contacts_changed event first, so the backlog below is the redemptions alone.
        await gateway_health_reaches(pair.gateway_socket, outbox_drained, timeout=30)
        assert pair.assistant.stop() == 0
        # A deadline, not a cancel scope: a cancelled call may still have been applied.
        deadline = anyio.current_time() + outage
        code = ""
        while anyio.current_time() < deadline:
            if counts["redeemed"] % 1000 == 0:
                # An invite has at most 1000 uses; a long outage needs several.
                created = await gw.call(
                    "invites_create",
                    {"contactId": contact, "sourceChannel": "sms", "maxUses": 1000},
                )
                code = created["code"]
            await gw.call(
                "invites_redeem",
                {"sourceChannel": "sms", "code": code, "externalUserId": f"o{counts['redeemed']}"},
            )
            counts["redeemed"] += 1
            await anyio.sleep(0.01)
        health = await gw.call("health")
        assert health["assistant"]["state"] == "down"
        assert health["outbox"]["pending"] == counts["redeemed"]
        pair.assistant.restart()

        await gateway_health_reaches(pair.gateway_socket, outbox_drained, timeout=60)
    async with Client(pair.assistant_socket) as assistant:
        stored = await assistant.call(
            "db_proxy",
            {
                "sql": "SELECT count(*) AS n FROM events WHERE kind = 'invite_redeemed'",
                "mode": "query",
            },
        )
    assert stored["rows"] == [{"n": counts["redeemed"]}]
    counts["outage seconds"] = int(outage)
    report("assistant outage", counts)


def test_sigterm_on_the_gateway_is_exit_zero_even_with_the_assistant_gone(pair: Pair) -> None:
    pair.assistant.kill()
    assert pair.gateway.stop() == 0
    assert "gatewayd stopped" in pair.gateway.stderr()
