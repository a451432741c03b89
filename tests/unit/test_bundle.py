"""Bundle verify and restore as pure file logic, on bundles that break the pair
(SECURITY-REVIEW-3 #2, #4, #5, #7, #8, #13): each is refused with words, and the state
directory is left exactly as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pair.ctl.checks import verify
from pair.ctl.restore import Refused, discard_kept, restore
from pair.runtime.errors import StartupError
from pair.runtime.files import Dir, UnsafePath
from pair.runtime.restore import RestoreError, hold_for_daemon, lock_for_restore
from tests.support.bundles import fill_state, make_bundle, rebundle, state_files, write_manifest
from tests.support.disk import needs_root, small_disk

ROOT = Path(__file__).resolve().parents[2]


def restored(bundle: Path, state: Path) -> str:
    with Dir.open(state) as directory:
        return restore(bundle, directory, lambda: None)[1]


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundles")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def failed_lines(path: Path) -> list[str]:
    return [check.line for check in verify(path)[1] if not check.ok]


def test_a_bundle_made_by_this_builds_migrations_verifies_and_restores(
    bundle: Path, state: Path
) -> None:
    assert failed_lines(bundle) == []
    fill_state(state)
    line = restored(bundle, state)
    assert line.startswith(f"restored gateway.db, gateway.key, assistant.db into {state}")
    assert (state / "gateway.key").read_bytes() == (bundle / "gateway.key").read_bytes()
    assert sorted(p.name for p in (state / "pre-restore").iterdir()) == [
        "assistant.db", "gateway.db", "gateway.db-wal", "gateway.key",
    ]  # fmt: skip


BREAKS = [
    ("gateway", "DROP TABLE redeem_failures", "table redeem_failures is missing"),
    ("gateway", "DROP TABLE contact_channels", "table contact_channels is missing"),
    ("assistant", "DROP TABLE idempotency_keys", "table idempotency_keys is missing"),
    (
        "gateway",
        "CREATE TRIGGER eat AFTER INSERT ON outbox BEGIN DELETE FROM outbox; END",
        "trigger 'eat' (on 'outbox') is not one pair makes",
    ),
    (
        "gateway",
        "CREATE TRIGGER again AFTER UPDATE OF use_count ON ingress_invites"
        " BEGIN UPDATE ingress_invites SET use_count = 0; END",
        "trigger 'again' (on 'ingress_invites') is not one pair makes",
    ),
    (
        "assistant",
        "CREATE TRIGGER ev_eat AFTER INSERT ON events BEGIN DELETE FROM events; END",
        "trigger 'ev_eat' (on 'events') is not one pair makes",
    ),
    (
        "assistant",
        "CREATE TRIGGER eat AFTER INSERT ON EVENTS BEGIN SELECT 1; END",
        "trigger 'eat' (on 'events') is not one pair makes",
    ),
    (
        "gateway",
        "INSERT INTO outbox (event_id, kind, payload, created_at) VALUES ('e', 'k', '{}', 1);"
        " UPDATE sqlite_sequence SET seq = 9223372036854775807 WHERE name = 'outbox'",
        "sqlite_sequence of 'outbox' is 9223372036854775807",
    ),
    (
        "gateway",
        "CREATE VIEW v AS SELECT * FROM contacts",
        "view 'v' (on 'v') is not one pair makes",
    ),
    (
        "assistant",
        "ALTER TABLE events ADD COLUMN extra",
        "table events is not as this build makes it",
    ),
    (
        "gateway",
        "DROP INDEX idx_ingress_invites_code_lookup",
        "index idx_ingress_invites_code_lookup is missing",
    ),
    ("gateway", "PRAGMA user_version = -1", "schema version -1 is not one pair ever made"),
    ("assistant", "PRAGMA user_version = 0", "table 'events' (on 'events') is not one pair makes"),
]


@pytest.mark.parametrize(("daemon", "sql", "said"), BREAKS)
def test_a_bundle_that_breaks_the_pair_fails_verify_and_restores_nothing(
    bundle: Path, state: Path, daemon: str, sql: str, said: str
) -> None:
    rebundle(bundle, daemon, sql)
    assert any(said in line for line in failed_lines(bundle)), failed_lines(bundle)
    before = fill_state(state)
    with pytest.raises(Refused) as refused:
        restored(bundle, state)
    assert any(said in check.line for check in refused.value.checks)
    assert state_files(state) == before


@pytest.mark.parametrize(("daemon", "table"), [("gateway", "outbox"), ("assistant", "events")])
def test_a_trigger_named_like_sqlites_own_is_refused_all_the_same(
    bundle: Path, daemon: str, table: str
) -> None:
    """SQLite loads a trigger whatever its name: `sqlite_` hides nothing (review 3b)."""
    rebundle(
        bundle, daemon, "PRAGMA writable_schema = ON",
        "INSERT INTO sqlite_schema (type, name, tbl_name, rootpage, sql) VALUES ('trigger',"
        f" 'sqlite_eat', '{table}', 0, 'CREATE TRIGGER sqlite_eat AFTER INSERT ON {table}"
        f" BEGIN DELETE FROM {table}; END')",
    )  # fmt: skip
    lines = failed_lines(bundle)
    assert any(
        f"trigger 'sqlite_eat' (on '{table}') is not one pair makes" in line for line in lines
    )


@pytest.mark.parametrize("size", [31, 33, 1 << 20])
def test_a_key_of_any_length_but_32_bytes_is_refused(bundle: Path, size: int) -> None:
    (bundle / "gateway.key").write_bytes(b"k" * size)
    write_manifest(bundle)
    assert any(f"gateway.key: {size} bytes; a key is 32" in line for line in failed_lines(bundle))


def test_a_copy_that_fails_its_checks_never_reaches_the_state_directory(
    bundle: Path, state: Path
) -> None:
    """Checked in pairctl's own directory and handed over only once good: the daemon
    user never sees a byte of a bundle that failed (a hard link on it would keep them)."""
    (bundle / "gateway.key").write_bytes(b"x" * 32)
    before = fill_state(state)
    with pytest.raises(Refused):
        restored(bundle, state)
    assert state_files(state) == before
    assert not list(state.parent.glob(".pair-private-*"))


def test_finish_refuses_a_fifo_or_link_where_the_kept_files_go_and_never_waits(
    state: Path, tmp_path: Path
) -> None:
    fill_state(state)
    os.mkfifo(state / "pre-restore")
    with Dir.open(state) as directory, pytest.raises(UnsafePath, match="is a FIFO"):
        discard_kept(directory)
    (state / "pre-restore").unlink()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "precious").write_text("x")
    os.symlink(tmp_path / "elsewhere", state / "pre-restore")
    with Dir.open(state) as directory, pytest.raises(UnsafePath, match="symbolic link"):
        discard_kept(directory)
    assert (tmp_path / "elsewhere" / "precious").exists()


def test_caller_tables_views_and_triggers_of_the_assistant_are_restored(bundle: Path) -> None:
    rebundle(
        bundle, "assistant",
        "CREATE TABLE notes (v)", "CREATE INDEX notes_v ON notes (v)",
        "CREATE VIEW notes_view AS SELECT v FROM notes",
        "CREATE TRIGGER notes_t AFTER INSERT ON notes BEGIN SELECT 1; END",
    )  # fmt: skip
    assert failed_lines(bundle) == []


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["databases"]["gateway"].update(file="/etc/passwd"),
        lambda m: m["files"][1].update(name="../gateway.key"),
        lambda m: m["files"].append(dict(m["files"][0], name="extra.db")),
    ],
)
def test_a_manifest_naming_other_files_is_refused(bundle: Path, state: Path, edit: object) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert callable(edit)
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert any("a bundle holds exactly" in line for line in failed_lines(bundle))
    before = fill_state(state)
    with pytest.raises(Exception, match="a bundle holds exactly"):
        restored(bundle, state)
    assert state_files(state) == before


@pytest.mark.parametrize("plant", ["fifo", "link to /dev/zero", "link to a secret"])
def test_a_bundle_file_that_is_not_regular_is_refused_at_once(
    bundle: Path, tmp_path: Path, plant: str
) -> None:
    (bundle / "gateway.key").unlink()
    secret = tmp_path / "secret"
    secret.write_text("TOP SECRET")
    if plant == "fifo":
        os.mkfifo(bundle / "gateway.key")
    else:
        os.symlink("/dev/zero" if "zero" in plant else secret, bundle / "gateway.key")
    lines = failed_lines(bundle)
    assert any(
        "gateway.key: cannot be read" in line and "not a regular file" in line for line in lines
    )
    assert not any(
        "TOP SECRET" in line or "sha256 " in line for line in lines if "gateway.key" in line
    )


def test_a_sparse_database_is_refused_before_a_byte_is_copied(bundle: Path, state: Path) -> None:
    os.truncate(bundle / "gateway.db", 1 << 30)
    write_manifest(bundle)
    assert any("but its header says" in line for line in failed_lines(bundle))
    before = fill_state(state)
    with pytest.raises(Refused) as refused:
        restored(bundle, state)
    assert any("but its header says" in check.line for check in refused.value.checks)
    assert state_files(state) == before


def test_restore_never_writes_through_a_link_planted_as_its_copy(
    bundle: Path, state: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "shadow"
    victim.write_text("root:x:0:0\n")
    victim.chmod(0o640)
    fill_state(state)
    for name in ("gateway.key", "gateway.db", "assistant.db"):
        os.symlink(victim, state / f"{name}.restoring")
    restored(bundle, state)
    assert victim.read_text() == "root:x:0:0\n"
    assert oct(victim.stat().st_mode & 0o777) == oct(0o640)
    assert not (state / "gateway.key").is_symlink()
    assert (state / "gateway.key").read_bytes() == (bundle / "gateway.key").read_bytes()


def test_restore_reads_each_bundle_file_once(bundle: Path, state: Path) -> None:
    """What is checked is what is installed: a file swapped after it was read changes
    nothing, as none is read twice."""
    fill_state(state)
    script = f"""
import sys
from pathlib import Path
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
from pair.ctl.restore import restore
from pair.runtime.files import Dir, UnsafePath
with Dir.open({str(state)!r}) as state:
    restore(Path({str(bundle)!r}), state, lambda: None)
for name in ("gateway.db", "gateway.key", "assistant.db"):
    print(name, sum(1 for path in opened if path == name or path.endswith("/" + name)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["gateway.db", "1", "gateway.key", "1", "assistant.db", "1"]


def test_no_daemon_starts_during_a_restore_and_no_restore_begins_beside_a_daemon(
    state: Path,
) -> None:
    fill_state(state)
    with Dir.open(state) as directory, lock_for_restore(directory):
        with pytest.raises(StartupError, match="a restore is running in") as refused:
            hold_for_daemon(state, "gateway")
        assert refused.value.exit_code == 75
    with (
        hold_for_daemon(state, "gateway"),
        Dir.open(state) as directory,
        pytest.raises(RestoreError, match="a daemon is running on"),
    ):
        lock_for_restore(directory)


def test_a_restore_cut_mid_swap_stops_the_daemons_until_resumed(bundle: Path, state: Path) -> None:
    fill_state(state)
    cut = pairctl(state, "restore", str(bundle), PAIR_FAILPOINT="restore.swap_moved_aside")
    assert cut.returncode == -9
    assert (state / "RESTORING").exists()
    with pytest.raises(StartupError, match="restore --resume") as refused:
        hold_for_daemon(state, "assistant")
    assert refused.value.exit_code == 75
    again = pairctl(state, "restore", str(bundle))
    assert again.returncode == 75
    assert "was cut short" in again.stderr
    resumed = pairctl(state, "restore", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("gateway.db", "gateway.key", "assistant.db"):
        assert (state / name).read_bytes() == (bundle / name).read_bytes()
    hold_for_daemon(state, "assistant").close()


@needs_root
def test_a_swap_that_fails_midway_puts_every_file_back(
    bundle: Path, state: Path, tmp_path: Path
) -> None:
    """The assistant's WAL cannot be moved (it is a mount point): the gateway's files,
    already swapped, go back too; never a mixed cut (#8)."""
    before = fill_state(state)
    with small_disk(state / "assistant.db-wal"):
        with pytest.raises(RestoreError, match="every file was put back as it was"):
            restored(bundle, state)
        assert state_files(state) == before
        assert not (state / "RESTORING").exists()
        assert not list(state.glob("*.restoring"))


@needs_root
def test_a_restore_without_room_for_its_copies_changes_nothing(
    bundle: Path, tmp_path: Path
) -> None:
    rebundle(
        bundle, "assistant", "CREATE TABLE big (b)", "INSERT INTO big VALUES (zeroblob(5000000))"
    )
    with small_disk(tmp_path / "tiny") as tiny:
        state = tiny / "state"
        before = fill_state(state)
        with pytest.raises(Exception, match=r"the restore needs \d+ bytes beside .* are free"):
            restored(bundle, state)
        assert state_files(state) == before
        assert not list(state.glob("*.restoring"))


def pairctl(state: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pair.ctl", "--runtime-dir", str(state.parent / "run"),
         "--state-dir", str(state), *args],
        capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT, check=False,
    )  # fmt: skip
