"""One power cut, from its plan: the pair (and pairctl) run recording what reached the
disk; the power goes at the plan's moment and every process is killed at once; the disk
is rebuilt as the cut left it; the pair starts on it with no hand repair; and what was
acknowledged before the cut is checked, one finding a line."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import apsw

from pair.protocol.client import Client
from pair.runtime import powercut
from pair.testing import Pair
from tests.crash import disk
from tests.crash.workload import Acks, check, load

MOMENTS = (
    "load", "assistant-commit", "gateway-commit", "checkpoint", "backup", "restore",
    "first-start",
)  # fmt: skip
# How long a plan's operation is waited for before the power goes anyway.
OPERATION_WAIT = 4.0


@dataclass
class Plan:
    """Where the power goes: `moment`, and in which process at which operation (`who`,
    `at`: powercut's PAIR_POWERCUT_AT) or after `after` seconds of load."""

    seed: int
    moment: str
    who: str = ""
    at: str = ""
    after: float = 0.0
    unsynced: bool = False

    def __str__(self) -> str:
        where = f"{self.who} at operation {self.at}" if self.who else f"after {self.after:.2f}s"
        kept = "; unsynced sectors kept by chance" if self.unsynced else ""
        return f"seed {self.seed}: {self.moment}, cut in {where}{kept}"


def draw(seed: int) -> Plan:
    rng = random.Random(seed)
    moment = MOMENTS[seed % len(MOMENTS)]
    plan = Plan(seed, moment, after=rng.uniform(0.2, 1.2), unsynced=rng.random() < 0.5)
    if moment in ("assistant-commit", "gateway-commit"):
        plan.who, plan.at = moment.split("-")[0], str(rng.randint(20, 900))
    elif moment == "checkpoint":
        plan.who, plan.at = rng.choice(("assistant", "gateway")), f"db-write:{rng.randint(1, 6)}"
    elif moment == "backup":
        plan.who, plan.at = "pairctl", str(rng.randint(1, 30))
    elif moment == "restore":
        # A restore of this bundle is about 12 operations; past them the power goes after.
        plan.who, plan.at = "pairctl", str(rng.randint(1, 14))
    elif moment == "first-start":
        plan.who, plan.at = "gateway", str(rng.randint(1, 30))
    return plan


@dataclass
class Result:
    plan: Plan
    acks: Acks = field(default_factory=Acks)
    notes: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)


def run(
    plan: Plan,
    work: Path,
    *,
    environment: dict[str, str] | None = None,
    flags: dict[str, tuple[str, ...]] | None = None,
) -> Result:
    """Cut the power as `plan` says, in `work` (emptied first); what was found. `flags`:
    each daemon's extra flags, before and after the cut (`--synchronous normal`)."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "disk" / "state").mkdir(parents=True)
    (work / "disk" / "bundles").mkdir(mode=0o700)
    (work / "shadow").mkdir()
    result = Result(plan)
    old_contacts = _before(plan, work) if plan.moment == "restore" else set()
    disk.baseline(work / "disk", work / "shadow")
    env = {"PAIR_POWERCUT_SHADOW": str(work / "shadow"),
           "PAIR_POWERCUT_ROOT": str(work / "disk"), **(environment or {})}  # fmt: skip
    _cut(plan, work, env, result, flags or {})
    rng = random.Random(plan.seed) if plan.unsynced else None
    result.notes += disk.rebuild(work / "shadow", work / "disk", work / "after", rng)
    _after(plan, work, result, old_contacts, flags or {})
    return result


def _pair(
    root: Path,
    state: Path,
    env: dict[str, str],
    plan: Plan,
    flags: dict[str, tuple[str, ...]] | None = None,
) -> Pair:
    root.mkdir(exist_ok=True)
    flags = flags or {}
    both = Pair(
        root, flags.get("gateway", ()), assistant_args=flags.get("assistant", ()),
        assistant_state=state, gateway_state=state,
    )  # fmt: skip
    for daemon in both.daemons:
        daemon.env.update(env)
        if plan.who == daemon.name and env:
            daemon.env["PAIR_POWERCUT_AT"] = plan.at
    return both


def _cut(
    plan: Plan, work: Path, env: dict[str, str], result: Result, flags: dict[str, tuple[str, ...]]
) -> None:
    both = _pair(work / "live", work / "disk" / "state", env, plan, flags)
    off = work / "shadow" / "OFF"
    try:
        if plan.moment == "restore":
            _pairctl(work, env, plan, "restore", str(_bundle(work)))
            return
        both.assistant.start()
        both.gateway.start(wait=plan.moment != "first-start")
        anyio.run(_load_then_cut, plan, work, env, both, result.acks)
    except Exception as exc:  # the cut lands anywhere: a start or a call cut short
        if not off.exists():
            raise
        result.notes.append(f"cut during {type(exc).__name__}")
    finally:
        _power_off(work, both)


async def _load_then_cut(
    plan: Plan, work: Path, env: dict[str, str], both: Pair, acks: Acks
) -> None:
    rng = random.Random(plan.seed)
    async with anyio.create_task_group() as group:
        group.start_soon(load, both.gateway_socket, both.assistant_socket, acks, rng)
        await anyio.sleep(plan.after)
        if plan.moment == "checkpoint":
            # A daemon's last connection checkpoints the WAL into the database as it closes.
            daemon = both.gateway if plan.who == "gateway" else both.assistant
            await anyio.to_thread.run_sync(daemon.proc.terminate)  # type: ignore[union-attr]
            await anyio.sleep(0.5)
        elif plan.moment == "backup":
            await anyio.to_thread.run_sync(
                _pairctl, work, env, plan, "backup", str(work / "disk" / "bundles")
            )
        elif plan.who:
            # The plan's operation may come later than `after`: wait for it, a while.
            with anyio.move_on_after(OPERATION_WAIT):
                while not (work / "shadow" / "OFF").exists():
                    await anyio.sleep(0.01)
        group.cancel_scope.cancel()


def _pairctl(work: Path, env: dict[str, str], plan: Plan, *args: str) -> None:
    extra = {"PAIR_POWERCUT_AT": plan.at} if plan.who == "pairctl" else {}
    subprocess.run(
        [sys.executable, "-m", "pair.ctl", "--runtime-dir", str(work / "live" / "run"),
         "--state-dir", str(work / "disk" / "state"), *args],
        env={**os.environ, **env, **extra}, capture_output=True, timeout=60, check=False,
    )  # fmt: skip


def _power_off(work: Path, both: Pair) -> None:
    """Every process that could still write is killed at once (those that recorded, and
    the pair's, which may not have yet)."""
    with contextlib.suppress(FileExistsError):
        (work / "shadow" / "OFF").touch(exist_ok=False)
    if (work / "shadow" / "pids").is_dir():
        powercut.kill_all(str(work / "shadow"))
    for daemon in both.daemons:
        daemon.expected_down = True
    both.close()


def _before(plan: Plan, work: Path) -> set[str]:
    """For a restore: a bundle of a state with contacts A, then B written after it; the
    pair stopped. The contacts of the old state (A and B)."""
    both = _pair(work / "before", work / "disk" / "state", {}, plan)
    both.start()
    try:
        anyio.run(_contacts, both.gateway_socket, ["a1", "a2"])
        taken = subprocess.run(
            [sys.executable, "-m", "pair.ctl", "--runtime-dir", str(both.runtime),
             "backup", str(work / "disk" / "bundles")], capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert taken.returncode == 0, taken.stderr
        anyio.run(_contacts, both.gateway_socket, ["b1"])
    finally:
        assert both.stop_checked() == []
    return {"a1", "a2", "b1"}


async def _contacts(socket: str, names: list[str]) -> None:
    async with Client(socket) as gw:
        for name in names:
            await gw.call("contacts_create", {"displayName": name})


def _bundle(work: Path) -> Path:
    return next(p for p in (work / "disk" / "bundles").iterdir() if p.name.startswith("pair-"))


def _after(
    plan: Plan,
    work: Path,
    result: Result,
    old_contacts: set[str],
    flags: dict[str, tuple[str, ...]],
) -> None:
    state = work / "after" / "state"
    if (state / "RESTORING").exists():
        resumed = subprocess.run(
            [sys.executable, "-m", "pair.ctl", "--runtime-dir", str(work / "again" / "run"),
             "--state-dir", str(state), "restore", "--resume"], capture_output=True, text=True,
            check=False,
        )  # fmt: skip
        result.notes.append(f"restore --resume: exit {resumed.returncode}")
        if resumed.returncode != 0:
            result.findings.append(f"restore --resume failed: {resumed.stderr.strip()}")
            return
    both = _pair(work / "again", state, {}, plan, flags)
    try:
        both.start()
    except Exception as exc:
        result.findings.append(
            f"the pair did not start after the cut: {exc}; {both.gateway.log_tail()}"
        )
        both.close()
        return
    try:
        if plan.moment == "restore":
            found, note = anyio.run(_restored_whole, both.gateway_socket, old_contacts)
            result.findings += found
            result.notes.append(note)
        else:
            result.findings += anyio.run(
                check, both.gateway_socket, both.assistant_socket, result.acks
            )
        if plan.moment == "backup":
            result.findings += _bundles_verify(work / "after" / "bundles")
    finally:
        result.findings += both.stop_checked()
    result.findings += _integrity(state)


async def _restored_whole(socket: str, old: set[str]) -> tuple[list[str], str]:
    """The old state whole, or the bundle's: never a mix."""
    async with Client(socket) as gw:
        listed = await gw.call("contacts_list", {"limit": 500})
    names = {contact["displayName"] for contact in listed["contacts"]}
    if names == old:
        return [], "the old state, whole"
    if names == {"a1", "a2"}:
        return [], "the bundle's state"
    return [f"after a restore cut short the contacts are {sorted(names)}: neither cut"], ""


def _bundles_verify(bundles: Path) -> list[str]:
    listed = subprocess.run(
        [sys.executable, "-m", "pair.ctl", "--json", "backup", "--list", str(bundles)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    findings = []
    entries = json.loads(listed.stdout or "[]")
    if not isinstance(entries, list):
        return [f"backup --list {bundles} failed: {listed.stderr.strip()}"]
    for entry in entries:
        if entry["whole"]:
            verified = subprocess.run(
                [sys.executable, "-m", "pair.ctl", "backup", "--verify", entry["bundle"]],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if verified.returncode != 0:
                findings.append(
                    f"bundle {entry['bundle']} is listed whole but fails: {verified.stdout}"
                )
    return findings


def _integrity(state: Path) -> list[str]:
    findings = []
    for name in ("gateway.db", "assistant.db"):
        db = apsw.Connection(str(state / name))
        try:
            result = [str(row[0]) for row in db.execute("PRAGMA integrity_check")]
        finally:
            db.close()
        if result != ["ok"]:
            findings.append(f"{name}: integrity_check {result}")
    return findings
