"""Backup, verify and restore of the pair, against the real daemons and the real pairctl.

A bundle is both databases and the gateway's key, taken while the pair serves,
with the gateway's snapshot first so that every event it counts as delivered is
in the assistant's. Restored into a fresh state directory, the pair has every
contact, invite and event back, and delivers its outbox's backlog once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import apsw
import pytest

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError
from pair.testing import Pair, crash_at
from tests.support.ctl import json_of, pairctl
from tests.support.disk import needs_root, small_disk
from tests.support.raw import NOBODY, as_nobody
from tests.support.waiting import gateway_health_reaches, outbox_drained

pytestmark = pytest.mark.anyio


@contextlib.contextmanager
def started(root: Path, *gateway_args: str) -> Iterator[Pair]:
    root.mkdir(exist_ok=True)
    with Pair(root, gateway_args) as both:
        yield both


def ints(db: apsw.Connection, sql: str) -> list[int]:
    """The one row of `sql` as ints; the connection closed."""
    with contextlib.closing(db):
        row: Any = db.execute(sql).fetchall()[0]
    return [int(value) for value in row]


def snapshot_of(bundle: str, name: str) -> apsw.Connection:
    return apsw.Connection(
        f"file:{bundle}/{name}?immutable=1", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
    )


async def new_contact(gw: Client, name: str) -> str:
    return str((await gw.call("contacts_create", {"displayName": name}))["contact"]["id"])


async def new_code(gw: Client, contact_id: str) -> str:
    created = await gw.call("invites_create", {"contactId": contact_id, "sourceChannel": "sms"})
    return str(created["code"])


def take(pair: Pair, into: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return pairctl(pair, "--json", "backup", str(into), env=env)


async def test_backups_under_full_load_all_verify_and_each_holds_a_committed_prefix(
    short_tmp: Path,
) -> None:
    """Writes and redemptions at full speed, a bundle every second: each verifies, its
    assistant.db holds the counter's rows 1..k for some k (a prefix of what was
    committed, growing bundle after bundle), and every event its gateway.db counts as
    delivered is in its assistant.db."""
    into = short_tmp / "bundles"
    into.mkdir()
    with started(short_tmp / "pair") as pair:
        async with Client(pair.assistant_socket) as assistant, Client(pair.gateway_socket) as gw:
            counter = "CREATE TABLE counter (n INTEGER PRIMARY KEY)"
            await assistant.call("db_proxy", {"sql": counter, "mode": "exec"})
            contact = await new_contact(gw, "load")
            done = anyio.Event()
            committed = 0

            async def count_up() -> None:
                nonlocal committed
                while not done.is_set():
                    insert = {"sql": "INSERT INTO counter (n) VALUES (?)", "bind": [committed + 1]}
                    await assistant.call("db_proxy", {**insert, "mode": "run"})
                    committed += 1

            async def redeem(worker: int) -> None:
                n = 0
                while not done.is_set():
                    code = await new_code(gw, contact)
                    params = {
                        "sourceChannel": "sms",
                        "code": code,
                        "externalUserId": f"{worker}-{n}",
                    }
                    assert (await gw.call("invites_redeem", params))["outcome"] == "redeemed"
                    n += 1

            taken = []
            async with anyio.create_task_group() as group:
                group.start_soon(count_up)
                for worker in range(4):
                    group.start_soon(redeem, worker)
                for _ in range(5):
                    await anyio.sleep(1)
                    taken.append(await anyio.to_thread.run_sync(take, pair, into))
                done.set()
            metrics = await assistant.call("metrics")
    assert metrics["backup"]["count"] == 5
    assert metrics["backup"]["lastBytes"] > 0
    prefixes = []
    for result in taken:
        answer = json_of(result)
        assert answer["verified"] is True
        bundle = str(answer["bundle"])
        assert pairctl(pair, "backup", "--verify", bundle).returncode == 0
        rows, top, events = ints(
            snapshot_of(bundle, "assistant.db"),
            "SELECT count(*), coalesce(max(n), 0), (SELECT count(*) FROM events) FROM counter",
        )
        assert rows == top, f"{bundle}: counter rows are not 1..{top}"
        prefixes.append(top)
        seq, pending, dead = ints(
            snapshot_of(bundle, "gateway.db"),
            "SELECT (SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'outbox'),"
            " (SELECT count(*) FROM outbox), (SELECT count(*) FROM outbox_dead)",
        )
        assert events >= seq - pending - dead, f"{bundle}: delivered events missing"
    assert prefixes == sorted(prefixes)
    assert 0 < prefixes[-1] <= committed


async def test_a_daemon_killed_mid_backup_leaves_the_last_bundle_whole_and_none_partial_good(
    short_tmp: Path,
) -> None:
    into = short_tmp / "bundles"
    into.mkdir()
    with started(short_tmp / "pair") as pair:
        first = str(json_of(take(pair, into))["bundle"])
        pair.assistant.stop()
        with crash_at(pair.assistant, "backup.snapshot_written"):
            pair.assistant.start()
            killed = pairctl(pair, "backup", str(into))
            assert killed.returncode == 69, killed.stderr
        assert list((pair.state / "backup").glob("*.partial")), "the daemon's half snapshot"
        pair.assistant.start()
        # pairctl itself killed between the gateway's files and the assistant's.
        cut = take(pair, into, PAIR_FAILPOINT="pairctl.backup_collected_gateway")
        assert cut.returncode == -9

        listed = json.loads(pairctl(pair, "--json", "backup", "--list", str(into)).stdout)
        whole = [entry["bundle"] for entry in listed if entry["whole"]]
        assert whole == [first]
        partial = [entry["bundle"] for entry in listed if not entry["whole"]]
        assert len(partial) == 1
        assert pairctl(pair, "backup", "--verify", first).returncode == 0
        refused = pairctl(pair, "backup", "--verify", partial[0])
        assert refused.returncode == 1
        assert "not a finished bundle" in refused.stdout

        # The next backup works, and the daemon's leftover is gone.
        assert json_of(take(pair, into))["verified"] is True
        assert not list((pair.state / "backup").iterdir())


@needs_root
async def test_a_full_backup_disk_is_a_clear_error_and_the_pair_serves_on(
    short_tmp: Path,
) -> None:
    with started(short_tmp / "pair") as pair, small_disk(short_tmp / "disk") as disk:
        filler = disk / "filler"
        with open(filler, "wb") as out, contextlib.suppress(OSError):
            while True:
                out.write(bytes(65536))
                out.flush()
        full = pairctl(pair, "backup", str(disk))
        assert full.returncode == 73, full.stderr
        assert f"no space left in {disk} for the bundle; nothing was kept" in full.stderr
        assert os.listdir(disk) == ["filler"]
        async with Client(pair.gateway_socket) as gw, Client(pair.assistant_socket) as assistant:
            assert (await assistant.call("health"))["status"] == "ok"
            await new_contact(gw, "after the full disk")
        filler.unlink()
        assert json_of(take(pair, disk))["verified"] is True


async def test_a_restore_into_a_fresh_state_brings_everything_back_and_delivers_the_backlog_once(
    short_tmp: Path,
) -> None:
    """The gateway of the first pair delivers nowhere, so its outbox holds a backlog at the
    cut; two of those events already reached the assistant. Restored into a fresh state,
    the second pair has every contact and invite, the key (a code from before still
    redeems), and every event exactly once, in the outbox's order."""
    into = short_tmp / "bundles"
    into.mkdir()
    nowhere = str(short_tmp / "nowhere.sock")
    with started(short_tmp / "old", "--assistant-socket", nowhere) as old:
        async with Client(old.gateway_socket) as gw, Client(old.assistant_socket) as assistant:
            people = [await new_contact(gw, name) for name in ("Ana", "Bo", "Cy")]
            kept_code = await new_code(gw, people[0])
            used = await new_code(gw, people[1])
            redeemed = {"sourceChannel": "sms", "code": used, "externalUserId": "bo"}
            await gw.call("invites_redeem", redeemed)
            reader = apsw.Connection(str(old.gateway_db), flags=apsw.SQLITE_OPEN_READONLY)
            with contextlib.closing(reader):
                queued = "SELECT event_id, kind, payload FROM outbox ORDER BY seq"
                backlog: list[Any] = reader.execute(queued).fetchall()
            assert len(backlog) >= 4
            early = [{"id": i, "kind": k, "payload": json.loads(p)} for i, k, p in backlog[:2]]
            await assistant.call("emit_events", {"events": early})
            contacts_before = await gw.call("contacts_list", {})
            invites_before = await gw.call("invites_list", {})
        bundle = str(json_of(take(old, into))["bundle"])

    fresh = short_tmp / "new"
    fresh.mkdir()
    restored = pairctl(fresh, "restore", bundle)
    assert restored.returncode == 0, restored.stderr
    assert (
        f"restored gateway.db, gateway.key, assistant.db into {fresh / 'state'}" in restored.stdout
    )
    with started(fresh) as new:
        async with Client(new.gateway_socket) as gw, Client(new.assistant_socket) as assistant:
            await gateway_health_reaches(new.gateway_socket, outbox_drained)
            assert await gw.call("contacts_list", {}) == contacts_before
            assert await gw.call("invites_list", {}) == invites_before
            stored = await assistant.call(
                "db_proxy", {"sql": "SELECT id FROM events ORDER BY rowid", "mode": "query"}
            )
            assert [row["id"] for row in stored["rows"]] == [row[0] for row in backlog]
            again = {"sourceChannel": "sms", "code": kept_code, "externalUserId": "ana"}
            assert (await gw.call("invites_redeem", again))["outcome"] == "redeemed"


async def test_a_restore_over_a_used_state_keeps_the_old_files_aside_until_the_operator_says(
    short_tmp: Path,
) -> None:
    """The replaced files (a killed gateway's WAL with its database) stay in pre-restore/
    across the daemons' start, until `restore --finish`; a second restore waits for it."""
    into = short_tmp / "bundles"
    into.mkdir()
    with started(short_tmp / "pair") as pair:
        async with Client(pair.gateway_socket) as gw:
            await new_contact(gw, "in the bundle")
            bundle = str(json_of(take(pair, into))["bundle"])
            await new_contact(gw, "after the cut")
        refused = pairctl(pair, "restore", bundle)
        assert refused.returncode == 75
        assert "stop both daemons" in refused.stderr
        # Killed, the gateway leaves its WAL behind: applied to the restored file it would
        # undo the restore, so it goes aside with the file it belongs to.
        pair.gateway.kill()
        pair.assistant.stop()
        assert (pair.state / "gateway.db-wal").exists()
        done = pairctl(pair, "restore", bundle)
        assert done.returncode == 0, done.stderr
        aside = pair.state / "pre-restore"
        kept = {path.name for path in aside.iterdir()}
        assert {"gateway.db", "gateway.db-wal", "gateway.key", "assistant.db"} <= kept
        assert not (pair.state / "gateway.db-wal").exists()
        pair.assistant.start()
        pair.gateway.start()
        assert {path.name for path in aside.iterdir()} == kept
        async with Client(pair.gateway_socket) as gw:
            names = [c["displayName"] for c in (await gw.call("contacts_list", {}))["contacts"]]
        assert names == ["in the bundle"]
        pair.gateway.stop()
        pair.assistant.stop()
        again = pairctl(pair, "restore", bundle)
        assert again.returncode == 75
        assert f"{aside} holds the files an earlier restore replaced" in again.stderr
        finished = pairctl(pair, "restore", "--finish")
        assert finished.returncode == 0, finished.stderr
        assert not aside.exists()
        pair.assistant.start()
        pair.gateway.start()


def _edit_bundle(bundle: Path, name: str, sql: str) -> None:
    """Change one database of a bundle and its manifest entry to match, as a newer pair's
    bundle would be: only what is in the file differs."""
    db = apsw.Connection(str(bundle / name))
    db.execute(sql)
    db.close()
    manifest = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / name).read_bytes()
    for file in manifest["files"]:
        if file["name"] == name:
            file["bytes"], file["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


async def test_a_bundle_of_a_newer_schema_is_refused_with_what_to_do(short_tmp: Path) -> None:
    into = short_tmp / "bundles"
    into.mkdir()
    with started(short_tmp / "pair") as pair:
        bundle = Path(str(json_of(take(pair, into))["bundle"]))
    newer = into / "pair-backup-newer"
    shutil.copytree(bundle, newer)
    _edit_bundle(newer, "gateway.db", "PRAGMA user_version = 99")
    verified = pairctl(pair, "backup", "--verify", str(newer))
    assert verified.returncode == 1
    assert "gateway.db: schema version 99 is newer than this build of pair opens" in verified.stdout
    state = short_tmp / "target"
    state.mkdir()
    refused = pairctl(state, "restore", str(newer))
    assert refused.returncode == 1
    assert "failed verification; nothing was restored" in refused.stderr
    assert not (state / "state" / "gateway.db").exists()

    tampered = into / "pair-backup-tampered"
    shutil.copytree(bundle, tampered)
    with open(tampered / "assistant.db", "r+b") as file:
        file.seek(200)
        file.write(b"\xff" * 8)
    broken = pairctl(pair, "backup", "--verify", str(tampered))
    assert broken.returncode == 1
    assert "assistant.db: 28672 bytes" in broken.stdout
    assert "but the manifest says" in broken.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
async def test_backup_is_only_for_the_daemons_own_uid_and_root(short_tmp: Path) -> None:
    """A uid the socket lets in (--allow-uid) may call the pair's methods, not `backup`."""
    root = short_tmp / "pair"
    root.mkdir()
    both = Pair(root, ("--allow-uid", str(NOBODY), "--socket-mode", "666"))
    try:
        both.start()
        for path in (short_tmp, root, both.runtime):
            os.chmod(path, 0o755)
        message = {"jsonrpc": "2.0", "id": 1, "method": "backup"}
        answer, _ = as_nobody(both.gateway_socket, [], message)
        assert answer["error"]["data"]["errorCode"] == "FORBIDDEN"
        assert "only for the daemon's own uid and root" in answer["error"]["message"]
        health, _ = as_nobody(both.gateway_socket, [], {**message, "method": "health"})
        assert health["result"]["status"] == "ok"
        assert not (both.state / "backup").exists()
        async with Client(both.gateway_socket) as gw:
            assert (await gw.call("backup"))["daemon"] == "gateway"
            discovered = await gw.call("rpc.discover")
        backup = next(m for m in discovered["methods"] if m["name"] == "backup")
        assert backup["x-admin"] is True
    finally:
        both.close()


# Litestream's way with a database, in short: a read transaction held nearly all the
# time (so nobody checkpoints past what it has copied), released for its own PASSIVE
# checkpoints, and a RESTART checkpoint once the WAL passes max-checkpoint-page-count
# (here 4000 pages), which waits for the daemons' transactions to end. A checkpoint
# refused at once because the daemon's own automatic one is running is tried again.
LITESTREAM = textwrap.dedent(
    """
    import sys, time, apsw
    db = apsw.Connection(sys.argv[1])
    db.set_busy_timeout(5000)
    end = time.monotonic() + float(sys.argv[2])
    rounds = restarts = refused = 0
    while time.monotonic() < end:
        db.execute("BEGIN")
        db.execute("SELECT count(*) FROM sqlite_master").fetchall()
        time.sleep(0.2)
        db.execute("COMMIT")
        _, wal_pages, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0]
        if wal_pages >= 4000:
            restarts += 1
            for _ in range(10):
                busy, _, _ = db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()[0]
                if not busy:
                    break
                time.sleep(0.01)
            refused += busy
        rounds += 1
    print(rounds, restarts, refused)
    """
)


async def test_a_litestream_like_reader_beside_the_load_causes_no_errors_and_no_runaway_wal(
    short_tmp: Path,
) -> None:
    """Litestream beside each database (`LITESTREAM`) while four writers and redeemers run
    for 4 s: no call fails (the daemons wait out its checkpoints: busy_timeout 5 s), and
    the WALs stay bounded: every RESTART checkpoint it runs resets the WAL, as the daemons
    hold no read transaction of their own that would keep it from doing so."""
    with started(short_tmp / "pair") as pair:
        watchers = [
            subprocess.Popen(
                [sys.executable, "-c", LITESTREAM, str(path), "4"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for path in (pair.state / "assistant.db", pair.gateway_db)
        ]
        async with Client(pair.assistant_socket) as assistant, Client(pair.gateway_socket) as gw:
            await assistant.call("db_proxy", {"sql": "CREATE TABLE t (v BLOB)", "mode": "exec"})
            contact = await new_contact(gw, "load")
            failures: list[Any] = []

            async def write(worker: int) -> None:
                n = 0
                while any(watcher.poll() is None for watcher in watchers):
                    n += 1
                    try:
                        blob = "INSERT INTO t VALUES (randomblob(2000))"
                        await assistant.call("db_proxy", {"sql": blob, "mode": "run"})
                        code = await new_code(gw, contact)
                        user = f"{worker}-{n}"
                        redeem = {"sourceChannel": "sms", "code": code, "externalUserId": user}
                        await gw.call("invites_redeem", redeem)
                    except IpcHandlerError as exc:
                        failures.append(exc)

            async with anyio.create_task_group() as group:
                for worker in range(4):
                    group.start_soon(write, worker)
    outcomes = []
    for watcher in watchers:
        out, err = watcher.communicate(timeout=10)
        assert watcher.returncode == 0, err
        outcomes.append(tuple(map(int, out.split())))
    assert failures == [], [(f.code, f.message) for f in failures[:3]]
    for rounds, restarts, refused in outcomes:
        assert rounds > 5
        assert refused == 0, f"{refused} of {restarts} RESTART checkpoints could not reset the WAL"
    # The gateway writes several pages a redemption: its WAL passes the mark every round.
    assert outcomes[1][1] > 0
