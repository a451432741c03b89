"""The previous release and this one, mixed, under redemption load (`make test-skew`).

The previous release (`release.PREVIOUS`, from its git tag, in a venv of its own) and
today's tree run as the gateway and the assistant in all four combinations, on one
state directory, while a caller redeems invites without pause. A seeded random plan
(`plan.make_plan`) upgrades, downgrades, restarts and kills each side. At the end every
redemption the gateway committed has its event stored by the assistant exactly once, in
the order the gateway committed them, and no call was answered INTERNAL_ERROR.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import apsw
import pytest

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError, IpcTransportError
from pair.testing.daemons import DaemonProcess
from tests.skew.plan import Plan, Release, Side, Step, make_plan
from tests.skew.release import PREVIOUS, previous_python
from tests.support.waiting import eventually, gateway_health_reaches, outbox_drained

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

# Redemptions run this long after each step of the plan.
STEP_LOAD = 1.0
RETRY = 0.01


@dataclass
class Load:
    """One caller redeeming fresh invites in turn, as the gateway answers."""

    socket: str
    acknowledged: list[str] = field(default_factory=list)
    # Redemptions whose answer was lost (the gateway went away with the call in flight).
    unknown: set[str] = field(default_factory=set)
    internal_errors: list[str] = field(default_factory=list)
    refusals: Counter[str] = field(default_factory=Counter)

    async def run(self, done: anyio.Event) -> None:
        async with Client(self.socket, timeout=5, connect_timeout=1) as gw:
            contact = await self._retried(gw, "contacts_create", {"displayName": "skew"}, done)
            n = 0
            while not done.is_set() and contact is not None:
                params = {"contactId": contact["contact"]["id"], "sourceChannel": "sms"}
                created = await self._retried(gw, "invites_create", params, done)
                if created is None:
                    continue
                n += 1
                invite = created["invite"]["id"]
                redeem = {
                    "sourceChannel": "sms",
                    "code": created["code"],
                    "externalUserId": f"u{n}",
                }
                try:
                    answer = await gw.call("invites_redeem", redeem)
                except IpcTransportError as exc:
                    if exc.sent:
                        self.unknown.add(invite)
                    await anyio.sleep(RETRY)
                    continue
                except IpcHandlerError as exc:
                    self._refused(exc)
                    continue
                assert answer["outcome"] == "redeemed", answer
                self.acknowledged.append(invite)

    async def _retried(
        self, gw: Client, method: str, params: object, done: anyio.Event
    ) -> dict[str, Any] | None:
        """The call's answer, retried while the gateway is away; None once done."""
        while not done.is_set():
            try:
                answer: dict[str, Any] = await gw.call(method, params)
                return answer
            except IpcTransportError:
                await anyio.sleep(RETRY)
            except IpcHandlerError as exc:
                self._refused(exc)
                await anyio.sleep(RETRY)
        return None

    def _refused(self, exc: IpcHandlerError) -> None:
        self.refusals[exc.code] += 1
        if exc.code == "INTERNAL_ERROR":
            self.internal_errors.append(f"{exc.code}: {exc.message}")


class Sides:
    """The two daemons, each of the release the plan gives it, on one state directory."""

    def __init__(self, root: Path, plan: Plan) -> None:
        self.runtime = root / "run"
        self.state = root / "state"
        self.runtime.mkdir()
        self.pythons: dict[Release, tuple[str, ...]] = {
            "old": previous_python(),
            "new": (sys.executable,),
        }
        self.daemons = {
            "assistant": self._daemon("assistant", plan.assistant),
            "gateway": self._daemon("gateway", plan.gateway),
        }
        self.exits: list[str] = []

    def _daemon(self, side: Side, release: Release) -> DaemonProcess:
        # The previous release's assistant logs each call's outcome (at DEBUG): whether this
        # gateway ever sent it `_meta`, which it does not take, is read there.
        old_assistant = side == "assistant" and release == "old"
        env = {"PAIR_LOG_LEVEL": "DEBUG"} if old_assistant else None
        return DaemonProcess(side, self.runtime, self.state, python=self.pythons[release], env=env)

    def refused_meta(self) -> list[str]:
        """The previous release's assistant's answers of INVALID_PARAMS (to `_meta`)."""
        log = self.daemons["assistant"].stderr()
        return [line for line in log.splitlines() if "outcome=INVALID_PARAMS" in line]

    def start(self) -> None:
        self.daemons["assistant"].start()
        self.daemons["gateway"].start()

    def apply(self, step: Step) -> None:
        daemon = self.daemons[step.side]
        if step.action == "kill":
            daemon.kill()
        else:
            code = daemon.stop()
            if code != 0:
                self.exits.append(f"{step}: {step.side} exited {code}\n{daemon.log_tail()}")
        if step.action in ("upgrade", "downgrade"):
            daemon.close()
            release = step.gateway if step.side == "gateway" else step.assistant
            daemon = self.daemons[step.side] = self._daemon(step.side, release)
        daemon.start()

    def stop(self) -> None:
        for side in ("gateway", "assistant"):
            daemon = self.daemons[side]
            code = daemon.stop()
            if code != 0:
                self.exits.append(f"the end: {side} exited {code}\n{daemon.log_tail()}")

    def close(self) -> None:
        for daemon in self.daemons.values():
            daemon.close()


async def delivering(sides: Sides, when: str) -> int:
    """The assistant's count of stored redemption events once it has grown during this
    combination of releases (from right after the step to `STEP_LOAD` later, or longer):
    every combination keeps delivering, not only the one the plan ends in."""
    socket = str(sides.runtime / "assistant.sock")
    count = "SELECT count(*) AS n FROM events WHERE kind = 'invite_redeemed'"

    async def stored() -> int:
        async with Client(socket, timeout=5, connect_timeout=1) as assistant:
            answer = await assistant.call("db_proxy", {"sql": count, "mode": "query"})
        return int(answer["rows"][0]["n"])

    before = await stored()
    await anyio.sleep(STEP_LOAD)
    latest = before

    async def grew() -> bool:
        nonlocal latest
        latest = await stored()
        return latest > before

    try:
        await eventually(grew)
    except TimeoutError:
        async with Client(str(sides.runtime / "gateway.sock")) as gw:
            health = await gw.call("health")
        raise AssertionError(f"no event stored after {when}: {health}") from None
    return latest


def stored_redemptions(state: Path) -> list[str]:
    db = apsw.Connection(str(state / "assistant.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = db.execute(
            "SELECT json_extract(payload, '$.inviteId') FROM events"
            " WHERE kind = 'invite_redeemed' ORDER BY rowid"
        ).fetchall()
    finally:
        db.close()
    return [str(row[0]) for row in rows]


def redeemed_invites(state: Path) -> set[str]:
    db = apsw.Connection(str(state / "gateway.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = db.execute("SELECT id FROM ingress_invites WHERE use_count > 0").fetchall()
    finally:
        db.close()
    return {str(row[0]) for row in rows}


async def test_the_previous_release_and_this_one_mixed_under_redemption_load(
    short_tmp: Path,
) -> None:
    seed = int(os.environ.get("PAIR_SKEW_SEED") or secrets.randbelow(2**31))
    plan = make_plan(seed)
    assert len(plan.combinations()) == 4
    sides = Sides(short_tmp, plan)
    load = Load(str(sides.runtime / "gateway.sock"))
    lines = [f"the previous release {PREVIOUS} (old) and this tree (new)", *plan.lines()]
    print("\n" + "\n".join(lines), flush=True)
    try:
        sides.start()
        done = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(load.run, done)
            events = await delivering(sides, "the start")
            lines.append(f"  after 0: {len(load.acknowledged)} redemptions acknowledged,"
                         f" {events} events stored")  # fmt: skip
            for number, step in enumerate(plan.steps, 1):
                started = time.monotonic()
                await anyio.to_thread.run_sync(sides.apply, step)
                took = time.monotonic() - started
                events = await delivering(sides, f"step {number} ({step})")
                lines.append(f"  after {number} ({took:.1f} s): {len(load.acknowledged)}"
                             f" redemptions acknowledged, {events} events stored")  # fmt: skip
            done.set()
        gateway = str(sides.runtime / "gateway.sock")
        try:
            await gateway_health_reaches(gateway, outbox_drained)
        except TimeoutError:
            async with Client(gateway) as gw:
                health = await gw.call("health")
            raise AssertionError(
                f"the outbox never drained: {health}\n{sides.daemons['gateway'].log_tail()}"
            ) from None
        await anyio.to_thread.run_sync(sides.stop)
    finally:
        sides.close()
    stored = stored_redemptions(sides.state)
    committed = redeemed_invites(sides.state)
    counts = Counter(stored)
    lines += [
        f"result: {len(load.acknowledged)} acknowledged, {len(load.unknown)} with the answer"
        f" lost, {len(committed)} committed by the gateway, {len(stored)} events stored,"
        f" {sum(n - 1 for n in counts.values())} stored twice; refusals"
        f" {dict(load.refusals) or 'none'}",
    ]
    report = "\n".join(lines)
    print("\n".join(lines[len(plan.lines()) + 1 :]))
    (Path(__file__).resolve().parents[2] / ".pair").mkdir(exist_ok=True)
    (Path(__file__).resolve().parents[2] / ".pair" / "skew-last.txt").write_text(report + "\n")
    assert sides.exits == [], sides.exits
    assert sides.refused_meta() == [], "a peer of the previous release was sent _meta"
    assert load.internal_errors == []
    assert len(load.acknowledged) > 0
    assert [invite for invite, n in counts.items() if n > 1] == [], "an event stored twice"
    assert set(stored) == committed, "an event missing, or one for no redemption"
    assert set(load.acknowledged) <= committed
    assert committed - set(load.acknowledged) <= load.unknown
    acknowledged = set(load.acknowledged)
    assert [invite for invite in stored if invite in acknowledged] == load.acknowledged
