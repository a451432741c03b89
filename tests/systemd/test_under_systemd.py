"""The pair under the real systemd, installed by deploy/install.sh, driven as an operator would.

Each test leaves both services running, the units as installed.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.waiting import until
from tests.systemd.conftest import ROOT, install
from tests.systemd.machine import PREFIX, Machine

pytestmark = pytest.mark.timeout(180)

PROBE = Path(__file__).with_name("probe.py")
SERVICES = ("pair-assistant.service", "pair-gateway.service")
DAEMONS = ("assistant", "gateway")
STUCK = "SELECT length(trim(printf('%.*c', 150000, 'a'), printf('%.*c', 150000, 'b') || 'a')) AS n"
GRACE = 2


def unit(daemon: str) -> str:
    return f"pair-{daemon}.service"


def socket_path(daemon: str) -> str:
    return f"/run/pair/{daemon}.sock"


def main_pid(machine: Machine, daemon: str) -> tuple[str, str]:
    shown = machine.show(unit(daemon), "MainPID", "NRestarts")
    return shown["MainPID"], shown["NRestarts"]


def serving(machine: Machine, daemon: str) -> bool:
    shown = machine.show(unit(daemon), "ActiveState", "SubState", "MainPID")
    return (shown["ActiveState"], shown["SubState"]) == ("active", "running")


def pairctl_json(machine: Machine, *args: str) -> Any:
    result = machine.pairctl("--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assistant_query(machine: Machine, sql: str) -> list[dict[str, Any]]:
    params = json.dumps({"sql": sql, "mode": "query"})
    rows: list[dict[str, Any]] = pairctl_json(machine, "call", "assistant", "db_proxy", params)[
        "rows"
    ]
    return rows


@contextlib.contextmanager
def probing(machine: Machine, daemon: str) -> Iterator[dict[str, Any]]:
    """A caller looping connect + `health` on `daemon`'s socket; its counts once left."""
    stop = f"/run/probe-{daemon}-{time.monotonic_ns()}"
    caller = subprocess.Popen(
        machine.command("/usr/bin/python3", str(PROBE), socket_path(daemon), stop),
        stdout=subprocess.PIPE,
        text=True,
    )
    report: dict[str, Any] = {}
    try:
        until(machine.path(stop + ".started").exists, "the probe's first answer")
        yield report
    finally:
        machine.path(stop).touch()
        out, _ = caller.communicate(timeout=60)
        report.update(json.loads(out))


@contextlib.contextmanager
def drop_in(machine: Machine, daemon: str, text: str) -> Iterator[None]:
    """A runtime drop-in for the service, in force (restarted) while inside."""
    with drop_in_unit(machine, unit(daemon), text, restart=True):
        yield


@contextlib.contextmanager
def drop_in_unit(machine: Machine, name: str, text: str, restart: bool = False) -> Iterator[None]:
    """A runtime drop-in for unit `name` while inside (the unit restarted on the way in
    and out when `restart`)."""
    directory = machine.path(f"/run/systemd/system/{name}.d")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "50-test.conf").write_text(text)
    machine.run("systemctl", "daemon-reload")
    if restart:
        machine.run("systemctl", "restart", name)
    try:
        yield
    finally:
        (directory / "50-test.conf").unlink()
        machine.run("systemctl", "daemon-reload")
        if restart:
            machine.run("systemctl", "restart", name)


def test_the_first_pairctl_status_starts_both_daemons_through_their_sockets(
    machine: Machine,
) -> None:
    machine.run("systemctl", "stop", "pair-metrics.timer", *SERVICES)
    try:
        for daemon in DAEMONS:
            assert machine.show(unit(daemon), "ActiveState")["ActiveState"] == "inactive"
        # No --runtime-dir: pairctl finds the units' /run/pair from any directory.
        status = machine.pairctl("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert re.search(r"^assistant +up ", status.stdout, re.M)
        assert re.search(r"^gateway +up ", status.stdout, re.M)
        for daemon in DAEMONS:
            # Type=notify: active only once READY=1 came; STATUS= is the daemon's line.
            shown = machine.show(unit(daemon), "ActiveState", "SubState", "StatusText")
            assert (shown["ActiveState"], shown["SubState"]) == ("active", "running")
            assert shown["StatusText"].startswith(f"serving /var/lib/pair/{daemon}.db")
    finally:
        machine.run("systemctl", "start", "pair-metrics.timer")


def test_a_redemption_reaches_the_assistants_database_through_the_gateways_link(
    machine: Machine,
) -> None:
    contact = pairctl_json(machine, "contact", "create", "Ada")["contact"]["id"]
    invite = pairctl_json(machine, "invite", "create", "--contact", contact, "--channel", "tg")
    redeemed = pairctl_json(
        machine, "invite", "redeem", "--channel", "tg", "--code", invite["code"],
        "--external-user-id", "42",
    )  # fmt: skip
    assert redeemed["outcome"] == "redeemed"
    until(
        lambda: (
            pairctl_json(machine, "call", "gateway", "health")["assistant"]["state"] == "connected"
        ),
        "the gateway's link to the assistant is connected",
    )
    invite_id = invite["invite"]["id"]
    sql = (
        "SELECT count(*) AS n FROM events WHERE kind = 'invite_redeemed'"
        f" AND json_extract(payload, '$.inviteId') = '{invite_id}'"
    )
    until(lambda: assistant_query(machine, sql) == [{"n": 1}], "the event in assistant.db")
    assert pairctl_json(machine, "call", "gateway", "health")["outbox"]["pending"] == 0
    until(
        lambda: machine.show(unit("gateway"), "StatusText")["StatusText"].endswith(
            "assistant link connected"
        ),
        "systemctl status shows the link connected",
    )


@pytest.mark.parametrize("action", ["restart", "kill"])
@pytest.mark.parametrize("daemon", DAEMONS)
def test_a_restart_or_a_crash_keeps_the_socket_and_refuses_no_caller(
    machine: Machine, daemon: str, action: str
) -> None:
    """A caller loops connect + health through `systemctl restart` or a SIGKILL (and the
    automatic restart 1 s later): the socket file stays, and it is neither refused nor
    reset, but for the one call in flight at a SIGKILL."""
    other = "gateway" if daemon == "assistant" else "assistant"
    inode = machine.path(socket_path(daemon)).stat().st_ino
    pid, restarts = main_pid(machine, daemon)
    other_before = main_pid(machine, other)
    with probing(machine, daemon) as report:
        if action == "restart":
            machine.run("systemctl", "restart", unit(daemon))
        else:
            machine.run("systemctl", "kill", "-s", "KILL", unit(daemon))
        until(
            lambda: main_pid(machine, daemon)[0] not in ("0", pid) and serving(machine, daemon),
            f"{daemon} serving again",
        )
        assert machine.pairctl("status").returncode == 0
    counts = report["counts"]
    assert counts["ok"] > 0
    failures = {kind: n for kind, n in counts.items() if kind not in ("ok", "retried")}
    in_flight_at_kill = 1 if action == "kill" else 0
    assert sum(failures.values()) <= in_flight_at_kill, report
    assert machine.path(socket_path(daemon)).stat().st_ino == inode
    expected_restarts = int(restarts) + (1 if action == "kill" else 0)
    assert int(main_pid(machine, daemon)[1]) == expected_restarts
    assert main_pid(machine, other) == other_before


def test_a_frozen_daemon_is_killed_by_the_watchdog_and_served_again_on_the_same_socket(
    machine: Machine,
) -> None:
    # The units' 30 s, shortened for the test; the mechanism is the same.
    with drop_in(machine, "assistant", "[Service]\nWatchdogSec=2\n"):
        inode = machine.path(socket_path("assistant")).stat().st_ino
        pid, restarts = main_pid(machine, "assistant")
        machine.run("kill", "-STOP", pid)
        until(
            lambda: (
                main_pid(machine, "assistant")[0] not in ("0", pid)
                and serving(machine, "assistant")
            ),
            "a new assistant after the watchdog fired",
            timeout=60,
        )
        assert int(main_pid(machine, "assistant")[1]) == int(restarts) + 1
        assert machine.path(socket_path("assistant")).stat().st_ino == inode
        assert machine.pairctl("status").returncode == 0
        journal = machine.run("journalctl", "-u", unit("assistant"), "-o", "cat").stdout
        assert "Watchdog timeout" in journal


def test_systemctl_stop_ends_within_the_grace_with_a_statement_stuck_in_sqlite(
    machine: Machine,
) -> None:
    """A quadratic trim() runs for many seconds inside one SQLite step, which no
    interrupt reaches; the daemon still exits 0 within --grace of the SIGTERM."""
    flags = f"--log-format journal --grace {GRACE} --allow-group pair"
    command = f"{PREFIX}/assistant/current/bin/assistantd {flags}"
    with drop_in(machine, "assistant", f"[Service]\nExecStart=\nExecStart={command}\n"):
        pid, _ = main_pid(machine, "assistant")
        cpu_before = cpu_ticks(machine, pid)
        params = json.dumps({"sql": STUCK, "mode": "query", "timeoutMs": 60_000})
        stuck = subprocess.Popen(
            machine.command(f"{PREFIX}/bin/pairctl", "call", "assistant", "db_proxy", params),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # Nothing else runs on it: half a second of CPU is the statement.
            until(lambda: cpu_ticks(machine, pid) - cpu_before > 50, "the stuck statement runs")
            started = time.monotonic()
            machine.run("systemctl", "stop", unit("assistant"))
            took = time.monotonic() - started
        finally:
            stuck.wait(timeout=60)
        shown = machine.show(unit("assistant"), "ActiveState", "Result", "ExecMainStatus")
        assert shown == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
        assert took < GRACE + 1, f"systemctl stop took {took:.2f} s with --grace {GRACE}"
        journal = machine.run("journalctl", "-u", unit("assistant"), "-o", "cat").stdout
        assert "still in SQLite at exit" in journal


def cpu_ticks(machine: Machine, pid: str) -> int:
    fields = machine.run("cat", f"/proc/{pid}/stat").stdout.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_pairctl_serves_root_and_the_group_pair_and_tells_others_they_are_forbidden(
    machine: Machine,
) -> None:
    for name, groups in (("pairop", ["-G", "pair"]), ("outsider", [])):
        if machine.run("id", name, check=False).returncode != 0:
            machine.run("useradd", "--no-create-home", *groups, name)
    for user in (None, "pairop"):
        status = machine.pairctl("status", user=user)
        assert status.returncode == 0, status.stdout + status.stderr
        listed = machine.pairctl("contact", "list", user=user)
        assert listed.returncode == 0, listed.stderr
    status = machine.pairctl("status", user="outsider")
    assert status.returncode == 77
    assert re.search(r"^gateway +forbidden .*member of group pair", status.stdout, re.M)
    listed = machine.pairctl("contact", "list", user="outsider")
    assert listed.returncode == 77
    assert listed.stderr.startswith(
        "error: FORBIDDEN: permission denied on /run/pair/gateway.sock: run as root or as a"
        " member of group pair"
    )


def test_the_metrics_timer_writes_the_textfile_for_node_exporter(machine: Machine) -> None:
    timer = machine.show("pair-metrics.timer", "ActiveState", "UnitFileState")
    assert timer == {"ActiveState": "active", "UnitFileState": "enabled"}
    textfile = machine.path("/var/lib/pair-metrics/pair.prom")
    until(textfile.exists, "the timer's first run writes the textfile")
    assert 'pair_up{daemon="assistant"} 1.0' in textfile.read_text()
    assert 'pair_up{daemon="gateway"} 1.0' in textfile.read_text()
    service = machine.show("pair-metrics.service", "Result", "ExecMainStatus")
    assert service == {"Result": "success", "ExecMainStatus": "0"}


def test_a_good_metrics_run_writes_nothing_to_the_journal_and_a_failed_one_does(
    machine: Machine,
) -> None:
    """Every 15 s would be ~17,000 lines a day of systemd's Starting/Finished."""

    def said(cursor: str) -> list[str]:
        return [
            f"{entry.get('PRIORITY')} {entry['MESSAGE']}"
            for entry in machine.journal_after(cursor)
            if "pair-metrics.service" in (entry.get("UNIT"), entry.get("_SYSTEMD_UNIT"))
        ]

    cursor = machine.journal_cursor()
    for _ in range(3):
        machine.run("systemctl", "start", "pair-metrics.service")
    assert machine.show("pair-metrics.service", "Result")["Result"] == "success"
    assert said(cursor) == []
    cursor = machine.journal_cursor()
    with drop_in_unit(
        machine, "pair-metrics.service", "[Service]\nExecStart=\nExecStart=/bin/false\n"
    ):
        machine.run("systemctl", "start", "pair-metrics.service", check=False)
    assert any("Failed" in line or "failed" in line for line in said(cursor))
    machine.run("systemctl", "start", "pair-metrics.service")


def test_install_again_is_harmless_and_links_node_exporters_textfile_directory(
    machine: Machine,
) -> None:
    """While install.sh builds and switches each release, pairctl (run in a loop)
    always finds a whole release: never "not found", never a half-written venv."""
    machine.path("/var/lib/prometheus/node-exporter").mkdir(parents=True, exist_ok=True)
    stop = f"/run/pairctl-loop-{time.monotonic_ns()}"
    loop = (
        f"n=0; bad=0; while [ ! -e {stop} ]; do n=$((n+1));"
        f" {machine.pairctl_path} status >/dev/null 2>&1 || bad=$((bad+1)); done; echo $n $bad"
    )
    caller = subprocess.Popen(
        machine.command("/bin/sh", "-c", loop), stdout=subprocess.PIPE, text=True
    )
    try:
        install(machine)
    finally:
        machine.path(stop).touch()
        calls, failed = map(int, caller.communicate(timeout=60)[0].split())
    print(f"pairctl status during install.sh: {calls} calls, {failed} failed")
    assert calls > 0
    assert failed == 0
    link = machine.path("/var/lib/prometheus/node-exporter/pair.prom")
    assert link.is_symlink()
    assert str(link.readlink()) == "/var/lib/pair-metrics/pair.prom"
    assert machine.pairctl("status").returncode == 0


def test_an_upgrade_that_cannot_build_leaves_the_old_release_serving(machine: Machine) -> None:
    empty = ROOT / ".pair" / "empty-wheelhouse"
    empty.mkdir(parents=True, exist_ok=True)
    current = machine.path(f"{PREFIX}/assistant/current").readlink()
    pid, _ = main_pid(machine, "assistant")
    result = machine.run(
        "sh", str(ROOT / "deploy" / "install.sh"), "--only", "assistant",
        "--wheelhouse", str(empty), check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 69, result.stdout + result.stderr
    assert "the release was not built; the one running stays" in result.stderr
    assert machine.path(f"{PREFIX}/assistant/current").readlink() == current
    assert [
        p.name for p in machine.path(f"{PREFIX}/assistant").iterdir() if p.name.startswith(".")
    ] == []
    assert main_pid(machine, "assistant")[0] == pid
    assert machine.pairctl("status").returncode == 0


def test_the_journal_has_the_daemons_structured_fields(machine: Machine) -> None:
    for daemon in DAEMONS:
        out = machine.run("journalctl", "-u", unit(daemon), "-o", "json", "--no-pager").stdout
        entries = [json.loads(line) for line in out.splitlines()]
        ready = [entry for entry in entries if f"{daemon}d ready on" in entry["MESSAGE"]]
        assert ready, f"no ready line in {daemon}'s journal"
        entry = ready[-1]
        assert entry["PRIORITY"] == "6"
        assert entry["SYSLOG_IDENTIFIER"] == f"{daemon}d"
        assert entry["PAIR_DAEMON"] == daemon
        assert entry["LOGGER"] == "daemon"
        assert entry["CODE_FUNC"] == "announce"
        assert "ts" not in entry["MESSAGE"]


def test_one_redemption_is_followed_through_both_journals_by_its_trace_id(
    machine: Machine,
) -> None:
    contact = pairctl_json(machine, "contact", "create", "Tess")["contact"]["id"]
    invite = pairctl_json(machine, "invite", "create", "--contact", contact, "--channel", "tg")
    result = machine.pairctl(
        "--trace", "invite", "redeem", "--channel", "tg", "--code", invite["code"],
        "--external-user-id", "traced",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = re.search(r"journalctl TRACE_ID=([0-9a-f]{32})", result.stderr)
    assert found is not None, result.stderr
    invite_id = invite["invite"]["id"]

    def traced() -> list[tuple[str, str]]:
        machine.run("journalctl", "--sync")
        out = machine.run("journalctl", f"TRACE_ID={found[1]}", "-o", "json", "-q").stdout
        entries = [json.loads(line) for line in out.splitlines()]
        return [(entry["_SYSTEMD_UNIT"], entry["MESSAGE"]) for entry in entries]

    until(lambda: len(traced()) == 3, "three lines of the trace in the journal")
    lines = traced()
    redeemed, delivered = [line for daemon, line in lines if daemon == unit("gateway")]
    [stored] = [line for daemon, line in lines if daemon == unit("assistant")]
    assert redeemed.startswith(f"invite {invite_id} redeemed: contact {contact}")
    event_id = delivered.split()[1]
    assert delivered == f"event {event_id} (invite_redeemed) delivered"
    assert stored == f"event {event_id} (invite_redeemed) stored"


@pytest.mark.parametrize("service", [*SERVICES, "pair-metrics.service"])
def test_systemd_analyze_security_rates_each_service_at_most_1(
    machine: Machine, service: str
) -> None:
    out = machine.run("systemd-analyze", "security", "--no-pager", service).stdout
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", out)
    assert match, out
    assert float(match[1]) <= 1.0, out


def test_backup_and_restore_with_the_units_as_installed(machine: Machine) -> None:
    """Root takes a bundle while the pair serves (each daemon, as user pair under
    ProtectSystem=strict, writes its snapshot in its StateDirectory); a member of group
    pair may not; the restore is refused until the sockets are stopped too, puts files
    owned by pair in place, and the daemons started by their sockets serve the bundle."""
    pairctl_json(machine, "contact", "create", "in the bundle")
    if machine.run("id", "pairop", check=False).returncode != 0:
        machine.run("useradd", "--no-create-home", "-G", "pair", "pairop")
    machine.run("install", "-d", "-o", "pairop", "/var/backups/pairop")
    denied = machine.pairctl("backup", "/var/backups/pairop", user="pairop")
    assert denied.returncode == 77, denied.stderr
    assert "only for the daemon's own uid and root" in denied.stderr
    assert not list(machine.path("/var/backups/pairop").iterdir())
    machine.run("mkdir", "-p", "/var/backups/pair")
    taken = pairctl_json(machine, "backup", "/var/backups/pair")
    assert taken["verified"] is True
    bundle = taken["bundle"]
    assert not list(machine.path("/var/lib/pair/backup").iterdir())
    pairctl_json(machine, "contact", "create", "after the cut")

    refused = machine.pairctl("restore", bundle)
    assert refused.returncode == 75, refused.stderr
    units = [f"pair-{daemon}.{kind}" for daemon in DAEMONS for kind in ("socket", "service")]
    machine.run("systemctl", "stop", *units)
    try:
        restored = machine.pairctl("restore", bundle)
        assert restored.returncode == 0, restored.stderr
        owner = machine.run("stat", "-c", "%U %a", "/var/lib/pair/gateway.db").stdout.split()
        assert owner == ["pair", "600"]
    finally:
        machine.run("systemctl", "start", "pair-assistant.socket", "pair-gateway.socket")
    names = [c["displayName"] for c in pairctl_json(machine, "contact", "list")["contacts"]]
    assert "in the bundle" in names
    assert "after the cut" not in names
    assert pairctl_json(machine, "status")["assistant"]["status"] == "ok"
    kept = machine.path("/var/lib/pair/pre-restore")
    assert {"gateway.db", "gateway.key", "assistant.db"} <= {p.name for p in kept.iterdir()}
    finished = machine.pairctl("restore", "--finish")
    assert finished.returncode == 0, finished.stderr
    assert not kept.exists()
