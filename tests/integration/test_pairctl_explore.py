"""pairctl for the on-call engineer: from any directory, errors as JSON, what can be called,
SQL by hand, and a second `up` that says why it cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

from pair.testing import Pair


def pairctl_in(
    where: Path, runtime: Path, *args: str, env_dir: bool = True, columns: int | None = None
) -> subprocess.CompletedProcess[str]:
    """pairctl run from `where`, told of `runtime` only through $PAIR_RUNTIME_DIR (and of
    the terminal's width through $COLUMNS)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PAIR_")}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    if env_dir:
        env["PAIR_RUNTIME_DIR"] = str(runtime)
    return subprocess.run(
        [sys.executable, "-m", "pair.ctl", *args],
        cwd=where, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_pairctl_finds_the_pair_from_any_directory(pair: Pair, tmp_path: Path) -> None:
    status = pairctl_in(tmp_path, pair.runtime, "status")
    assert status.returncode == 0, status.stderr
    assert "assistant link connected" in status.stdout


def test_a_down_pair_says_where_pairctl_looked(short_tmp: Path) -> None:
    status = pairctl_in(short_tmp, short_tmp / "run", "status")
    assert status.returncode == 69
    assert f"looked in {short_tmp / 'run'} (from $PAIR_RUNTIME_DIR)" in status.stderr


def test_with_json_an_error_is_a_json_object_on_stdout_too(pair: Pair, short_tmp: Path) -> None:
    refused = pairctl_in(
        short_tmp, pair.runtime, "--json", "invite", "redeem", "--channel", "sms", "--code", "x1"
    )
    assert refused.returncode == 1
    error = json.loads(refused.stdout)
    assert (error["code"], error["errorCode"]) == (-32602, "INVALID_PARAMS")
    assert error["data"]["path"] == "$.code"
    assert "--code must be 6 digits" in refused.stderr
    down = pairctl_in(short_tmp, short_tmp / "nothing", "contact", "list", "--json")
    assert down.returncode == 69
    error = json.loads(down.stdout)
    assert (error["code"], error["errorCode"]) == (None, "UNAVAILABLE")
    assert error["data"] == {"socket": str(short_tmp / "nothing" / "gateway.sock"), "sent": False}
    usage = pairctl_in(short_tmp, pair.runtime, "--json", "call", "gateway", "health", "[")
    assert usage.returncode == 2
    assert json.loads(usage.stdout)["errorCode"] == "USAGE"


def test_methods_and_describe_say_what_each_daemon_can_be_called_with(
    pair: Pair, short_tmp: Path
) -> None:
    listed = pairctl_in(short_tmp, pair.runtime, "methods", columns=100)
    assert listed.returncode == 0, listed.stderr
    rows = {tuple(line.split()[:2]) for line in listed.stdout.splitlines()}
    assert {("assistant", "db_proxy"), ("gateway", "invites_create")} <= rows
    # Summaries are cut to the terminal, unless that would leave them under 24 columns.
    narrowest = max(
        len(line) - len(line.rsplit("  ", 1)[-1]) for line in listed.stdout.splitlines()
    )
    assert max(map(len, listed.stdout.splitlines())) <= max(100, narrowest + 24)
    described = pairctl_in(short_tmp, pair.runtime, "describe", "gateway", "invites_create")
    assert described.returncode == 0, described.stderr
    lines = [line.split() for line in described.stdout.splitlines()]
    assert ["contactId", "string", "required", "length", "1..200"] in lines
    assert ["ttlSeconds", "integer", "optional", "default", "86400,", "1..2592000"] in lines
    assert ["code", "string", "required"] in lines
    unknown = pairctl_in(short_tmp, pair.runtime, "describe", "gateway", "invites_frob")
    assert unknown.returncode == 2
    assert "`pairctl methods gateway` lists them" in unknown.stderr


def test_sql_prints_a_table_and_writes_with_binds(pair: Pair, short_tmp: Path) -> None:
    def sql(*args: str) -> subprocess.CompletedProcess[str]:
        return pairctl_in(short_tmp, pair.runtime, "sql", *args)

    assert sql("--write", "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)").returncode == 0
    wrote = sql("--write", "INSERT INTO notes (body) VALUES (:body)", "--bind", "body=hi there")
    assert wrote.stdout.strip() == "1 changed"
    sql("--write", "INSERT INTO notes (body) VALUES (:body)", "--bind", 'body="007"')
    shown = sql("SELECT id, body FROM notes WHERE id >= :min ORDER BY id", "--bind", "min=1")
    assert shown.stdout.splitlines() == [
        "id  body",
        "1   hi there",
        "2   007",
        "2 rows",
    ]
    raw = sql("SELECT count(*) AS n FROM notes", "--json")
    assert json.loads(raw.stdout)["rows"] == [{"n": 2}]
    read_only = sql("DELETE FROM notes")
    assert read_only.returncode == 1
    assert "use --write" in read_only.stderr
    refused = sql("--write", "DROP TABLE events")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: SQL_FORBIDDEN")
    assert sql("SELECT 1", "--bind", "oops").returncode == 2
    script = sql("SELECT 1; SELECT 2")
    assert "(a script: pairctl call assistant db_proxy, mode exec)" in script.stderr


def test_a_refusal_names_pairctls_flags_but_the_wire_params_for_call(
    pair: Pair, short_tmp: Path
) -> None:
    contact = json.loads(
        pairctl_in(short_tmp, pair.runtime, "--json", "contact", "create", "Ann").stdout
    )["contact"]["id"]
    invite = json.loads(
        pairctl_in(
            short_tmp, pair.runtime, "--json", "invite", "create", "--contact", contact,
            "--channel", "tg",
        ).stdout
    )  # fmt: skip
    flags = pairctl_in(
        short_tmp, pair.runtime, "invite", "redeem", "--channel", "tg", "--code", invite["code"]
    )
    assert flags.returncode == 1
    assert "--external-user-id or --external-chat-id is required" in flags.stderr
    assert "externalUserId" not in flags.stderr.replace("$.externalUserId", "")
    params = json.dumps({"sourceChannel": "tg", "code": invite["code"]})
    wire = pairctl_in(short_tmp, pair.runtime, "call", "gateway", "invites_redeem", params)
    assert wire.returncode == 1
    assert "externalUserId or externalChatId is required" in wire.stderr


def test_a_second_up_on_a_running_pair_stops_and_says_why_once(pair: Pair) -> None:
    up = subprocess.run(
        [sys.executable, "-m", "pair.ctl", "--runtime-dir", str(pair.runtime),
         "--state-dir", str(pair.state), "up"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert up.returncode == 75
    assert up.stdout.count("cannot start (exit 75: its socket is served by another") == 1
    assert "restarting" not in up.stdout
    assert pair.gateway.call("health")["status"] == "ok"


# Each acts on a terminal: it sets the title, clears the screen, hides the text, returns
# the carriage, starts a C1 CSI and OSC, reverses the text.
ESCAPES = "x\x1b]0;PWNED\x07\x1b[2J\x1b[8m\rroot\x9b31m\x9d0;t\x9c\u202eexe.txt\u2066"


def acts(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text)


def test_what_callers_wrote_cannot_act_on_the_operators_terminal(
    pair: Pair, short_tmp: Path
) -> None:
    """Values, column names and contact names holding escapes are shown escaped, in human
    output and with --json (which still reads back as what was stored); letters stay."""

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        done = pairctl_in(short_tmp, pair.runtime, *args)
        assert done.returncode == 0, done.stderr
        return done

    ctl("sql", "--write", "CREATE TABLE esc (v TEXT)")
    ctl("sql", "--write", "INSERT INTO esc (v) VALUES (:v)", "--bind", f"v={ESCAPES}")
    ctl("contact", "create", f"Zoë 日本 {ESCAPES}")
    for shown in (
        ctl("sql", f'SELECT v AS "col{ESCAPES}" FROM esc'),
        ctl("contact", "list"),
        ctl("--json", "sql", "SELECT v FROM esc"),
        ctl("--json", "contact", "list"),
    ):
        assert not acts(shown.stdout.replace("\n", "")), shown.stdout
    assert "Zoë 日本" in ctl("contact", "list").stdout
    rows = json.loads(ctl("--json", "sql", "SELECT v FROM esc").stdout)["rows"]
    assert rows == [{"v": ESCAPES}]


def test_a_bind_pairctl_cannot_bind_as_meant_is_a_usage_error(short_tmp: Path) -> None:
    """Not finite (SQLite would store NULL), or a name given twice (every spelling of a
    name binds the one parameter): refused with the parameter named, exit 2, nothing sent."""

    def sql(*binds: str) -> subprocess.CompletedProcess[str]:
        args = [arg for bind in binds for arg in ("--bind", bind)]
        return pairctl_in(short_tmp, short_tmp / "nothing", "sql", "SELECT :v AS v", *args)

    for value in ("1e400", "-1e400", "-Infinity", "Infinity", "NaN", "[1, 1e999]"):
        refused = sql(f"v={value}")
        assert refused.returncode == 2, (value, refused.stderr)
        assert f"--bind v={value}: not a finite number" in refused.stderr
    for binds in (("v=1", "v=2"), ("v=1", ":v=2"), ("@v=1", "$v=1"), ("$v=1", "v=1")):
        refused = sql(*binds)
        assert refused.returncode == 2, (binds, refused.stderr)
        assert f"--bind '{binds[1]}': parameter 'v' is already bound" in refused.stderr
