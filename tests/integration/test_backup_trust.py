"""What `pairctl backup` (often root) does with what a daemon answers and where it finds
the daemon: a forged or malformed `backup` answer, a socket of another user's, the
current directory as root (SECURITY-REVIEW-3 #1, #3, #15; NEW-USER-3 rows 21-24, 30)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pair.ctl.cli import main
from pair.testing import Pair
from tests.support.ctl import json_of, pairctl
from tests.support.raw import NOBODY

Answer = Callable[[Path], Any]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="other users' files need root")


@contextlib.contextmanager
def fake_gateway(path: Path, answer: Answer, root: Path) -> Iterator[None]:
    """A daemon on `path` answering `backup` with `answer(root)`, anything else 404."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    request = json.loads(_read_frame(conn))
                    result = answer(root) if request["method"] == "backup" else None
                    body = {"jsonrpc": "2.0", "id": request["id"], "result": result}
                    data = json.dumps(body).encode()
                    conn.sendall(struct.pack(">I", len(data)) + data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)


def _read_frame(conn: socket.socket) -> bytes:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    return exactly(struct.unpack(">I", exactly(4))[0])


def snapshot(files: list[tuple[str, Path]]) -> dict[str, Any]:
    entries = []
    for name, path in files:
        data = path.read_bytes() if path.is_file() else b""
        entries.append({"name": name, "path": str(path), "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    marks = {"outboxSeq": 0, "outboxPending": 0}
    return {"daemon": "gateway", "version": "0.2.0", "sqliteVersion": "3", "schemaVersion": 2,
            "takenAt": 1, "highWater": marks, "files": entries}  # fmt: skip


def plant(root: Path) -> tuple[Path, Path]:
    """An attacker's payload and a victim's file, both outside any bundle."""
    (root / "attacker").mkdir(exist_ok=True)
    (root / "victim").mkdir(exist_ok=True)
    payload, victim = root / "attacker" / "payload", root / "victim" / "passwd"
    payload.write_text("* * * * * root touch /PWNED\n")
    victim.write_text("root:x:0:0\n")
    return payload, victim


def backup_dir(root: Path, name: str) -> Path:
    """The daemon's own snapshot directory, with `name` planted in it as a link."""
    into = root / "state" / "backup"
    into.mkdir(parents=True, exist_ok=True)
    link = into / name
    if not link.is_symlink():
        link.symlink_to(plant(root)[1])
    return link


FORGERIES: dict[str, Answer] = {
    "absolute name": lambda r: snapshot([(str(r / "victim" / "cron.d-pwn"), plant(r)[0])]),
    "../ name": lambda r: snapshot(
        [("../../victim_copy", plant(r)[1]), ("gateway.key", plant(r)[0])]
    ),
    "the format's names, paths anywhere": lambda r: snapshot(
        [("gateway.db", plant(r)[1]), ("gateway.key", plant(r)[0])]
    ),
    "a link in its backup/": lambda r: snapshot(
        [
            ("gateway.db", backup_dir(r, "20261207T000000Z-0000abcd.gateway.db")),
            ("gateway.key", backup_dir(r, "20261207T000000Z-0000abcd.gateway.key")),
        ]
    ),
    "files not a list": lambda r: {**snapshot([]), "files": {"name": "gateway.db"}},
    "bytes as text": lambda r: {
        **snapshot([("gateway.db", plant(r)[1])]),
        "files": [{"name": "gateway.db", "path": "x", "bytes": "12", "sha256": "0"}],
    },
    "null": lambda r: None,
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_backup_answer_makes_pairctl_write_and_delete_nothing_outside_its_bundle(
    short_tmp: Path, forgery: str
) -> None:
    (short_tmp / "run").mkdir()
    into = short_tmp / "bundles"
    with fake_gateway(short_tmp / "run" / "gateway.sock", FORGERIES[forgery], short_tmp):
        result = pairctl(short_tmp, "backup", str(into))
    assert result.returncode not in (0, -9), result.stderr
    assert "Traceback" not in result.stderr
    assert "nothing" in result.stderr or "refusing" in result.stderr or "not" in result.stderr
    payload, victim = short_tmp / "attacker" / "payload", short_tmp / "victim" / "passwd"
    if payload.exists() or victim.exists():
        assert payload.read_text().startswith("* * * * *")
        assert victim.read_text() == "root:x:0:0\n"
    assert sorted(p.name for p in (short_tmp / "victim").glob("*")) in ([], ["passwd"])
    assert not list(short_tmp.rglob("victim_copy"))
    assert os.listdir(into) == []


@needs_root
def test_a_socket_or_snapshot_of_another_user_is_refused_with_its_owner(short_tmp: Path) -> None:
    (short_tmp / "run").mkdir()
    sock = short_tmp / "run" / "gateway.sock"
    with fake_gateway(sock, FORGERIES["absolute name"], short_tmp):
        os.chown(sock, NOBODY, NOBODY)
        result = pairctl(short_tmp, "backup", str(short_tmp / "bundles"))
    assert result.returncode == 73
    assert f"refusing {sock}: it belongs to nobody (uid {NOBODY})" in result.stderr
    assert not (short_tmp / "bundles").exists()


@needs_root
def test_as_root_pairctl_never_looks_in_the_current_directory(short_tmp: Path) -> None:
    """The review's cwd variant: a world-writable directory holding nobody's
    .pair/run/gateway.sock."""
    shared = short_tmp / "shared"
    (shared / ".pair" / "run").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAIR_", "XDG_RUNTIME"))}
    result = subprocess.run(
        [sys.executable, "-m", "pair.ctl", "backup", str(short_tmp / "b")],
        capture_output=True, text=True, cwd=shared, env=env, check=False,
    )  # fmt: skip
    if Path("/run/pair").is_dir():
        pytest.skip("an installed pair's /run/pair is what pairctl uses here")
    assert result.returncode == 2
    assert f"as root, pairctl does not use .pair/run in the current directory ({shared})" in (
        result.stderr
    )


def test_backup_makes_a_missing_dir_names_each_bundle_apart_and_lists_only_good_ones(
    short_tmp: Path,
) -> None:
    (short_tmp / "pair").mkdir()
    pair = Pair(short_tmp / "pair")
    pair.start()
    try:
        into = short_tmp / "new" / "bundles"
        (short_tmp / "new").mkdir()
        first = pairctl(pair, "backup", str(into))
        assert first.returncode == 0, first.stderr
        assert f"made {into} (mode 0700)" in first.stdout
        assert oct(into.stat().st_mode & 0o777) == oct(0o700)
        second = json_of(pairctl(pair, "--json", "backup", str(into)))
        third = json_of(pairctl(pair, "--json", "backup", str(into)))
        assert len({second["bundle"], third["bundle"]}) == 2
        damaged = Path(str(third["bundle"]))
        with open(damaged / "assistant.db", "ab") as grown:
            grown.write(b"xx")
        listed = json.loads(pairctl(pair, "--json", "backup", "--list", str(into)).stdout)
        states = {entry["bundle"]: entry for entry in listed}
        assert states[str(damaged)]["whole"] is False
        assert "DAMAGED" in states[str(damaged)]["state"]
        assert sum(entry["whole"] for entry in listed) == 2
    finally:
        assert pair.stop_checked() == []


def as_nobody(*argv: str) -> tuple[int, str]:
    """pairctl's main as uid nobody, forked from this process with every module it needs
    already loaded (nobody may not read this Python's own files): its exit code and
    everything it printed."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 70
        try:
            sys.stdout = sys.stderr = os.fdopen(write_end, "w")
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = main(list(argv))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as output:
        printed = output.read()
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), printed


@needs_root
def test_bundles_another_user_cannot_read_are_listed_as_unreadable_not_a_traceback(
    short_tmp: Path,
) -> None:
    from tests.support.bundles import make_bundle

    into = short_tmp / "bundles"
    make_bundle(into)
    into.chmod(0o755)
    short_tmp.chmod(0o755)
    code, printed = as_nobody("backup", "--list", str(into))
    assert (code, "Traceback" in printed) == (0, False), printed
    assert "pair-backup-20261207T000000Z  UNREADABLE: Permission denied" in printed
    into.chmod(0o700)
    code, printed = as_nobody("backup", "--list", str(into))
    assert (code, "Traceback" in printed) == (66, False), printed
    assert f"cannot list {into}: Permission denied" in printed


@needs_root
def test_a_restore_from_another_directory_never_makes_a_state_directory_there(
    short_tmp: Path,
) -> None:
    """NEW-USER-3 row 30: from a directory with no pair in it, the default state
    directory does not exist; the restore says so and makes nothing."""
    from tests.support.bundles import make_bundle

    elsewhere = short_tmp / "elsewhere"
    elsewhere.mkdir()
    os.chown(elsewhere, NOBODY, NOBODY)
    short_tmp.chmod(0o755)
    bundle = make_bundle(short_tmp / "bundles")
    (short_tmp / "bundles").chmod(0o755)
    previous = os.getcwd()
    os.chdir(elsewhere)
    try:
        code, printed = as_nobody("--runtime-dir", str(elsewhere), "restore", str(bundle))
    finally:
        os.chdir(previous)
    if Path("/var/lib/pair").is_dir():
        pytest.skip("an installed pair's /var/lib/pair is what pairctl uses here")
    assert code == 66, printed
    assert f"{elsewhere}/.pair/state does not exist (the default state directory" in printed
    assert list(elsewhere.iterdir()) == []
