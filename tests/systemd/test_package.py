"""The Debian packages under the real systemd, from install to purge, as an operator runs apt.

One machine goes through a package's life in order (the tests of this module share it
and run in file order): install, downgrade and upgrade of the whole pair and of one
side at a time under a caller, remove, reinstall, purge. A second machine is set up by
deploy/install.sh first and taken over by the package.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.waiting import until
from tests.systemd.conftest import Release, install, unavailable
from tests.systemd.machine import Machine, why_not

pytestmark = pytest.mark.timeout(600)

CALLER = Path(__file__).with_name("caller.py")
SIDES = ("gateway", "assistant")
# What piuparts leaves out of its comparison too: logs, caches, package manager state,
# and what the tools it runs rewrite (the account databases' backups, their lock).
IGNORED = (
    "/var/log/", "/var/cache/", "/var/lib/apt/", "/var/lib/dpkg/", "/etc/ld.so.cache",
    "/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-", "/etc/subuid-",
    "/etc/subgid-", "/etc/.pwd.lock",
    "/var/lib/systemd/timers/", "/var/lib/systemd/catalog/", "/root/",
)  # fmt: skip


# Where a package or its scripts write. The rest of the root is the host's, seen through
# the overlay as it changes (a checkout, a workspace) and no business of the package's.
ROOTS = ("/etc", "/usr", "/var", "/opt", "/srv", "/home")


def files(machine: Machine) -> set[str]:
    listed = machine.run("find", *ROOTS, "-xdev", timeout=120).stdout.split("\n")
    return {
        path
        for path in listed
        if path and not path.startswith(IGNORED) and "/__pycache__" not in path
    }


def apt(machine: Machine, *args: str) -> str:
    return machine.run(
        "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q", *args, timeout=300
    ).stdout


def apt_install(machine: Machine, *debs: str) -> str:
    return apt(machine, "install", "--allow-downgrades", "--no-install-recommends", *debs)


def pairctl_json(machine: Machine, *args: str, user: str | None = None) -> Any:
    result = machine.pairctl("--json", *args, user=user)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def versions(machine: Machine) -> dict[str, str]:
    status = pairctl_json(machine, "status")
    return {side: status[side]["version"] for side in SIDES}


def main_pid(machine: Machine, side: str) -> str:
    return machine.show(f"pair-{side}.service", "MainPID")["MainPID"]


def socket_inode(machine: Machine, side: str) -> int:
    return machine.path(f"/run/pair/{side}.sock").stat().st_ino


@dataclass
class Watch:
    """What a side's daemon did between two journal cursors: its PIDs and its starts."""

    pids: set[str]
    starts: int


# systemd's "Started ..." of a unit (sd-messages.h SD_MESSAGE_UNIT_STARTED).
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"


def watched(machine: Machine, side: str, cursor: str) -> Watch:
    unit = f"pair-{side}.service"
    pids, starts = set(), 0
    for entry in machine.journal_after(cursor):
        if entry.get("_SYSTEMD_UNIT") == unit:
            pids.add(entry["_PID"])
        if entry.get("UNIT") == unit and entry.get("MESSAGE_ID") == UNIT_STARTED:
            starts += 1
    return Watch(pids, starts)


@contextlib.contextmanager
def calling(machine: Machine, contact: str) -> Iterator[dict[str, Any]]:
    """The caller (tests/systemd/caller.py) looping over both daemons; its report once left."""
    stop = f"/run/caller-{time.monotonic_ns()}"
    caller = subprocess.Popen(
        machine.command("/usr/bin/python3", str(CALLER), "/run/pair", contact, stop),
        stdout=subprocess.PIPE,
        text=True,
    )
    report: dict[str, Any] = {}
    try:
        until(machine.path(stop + ".started").exists, "the caller's first round", 60)
        yield report
        # A few whole rounds after the change, on whatever it left serving.
        rounds = machine.path(stop + ".rounds")
        after = int(rounds.read_text() or 0)
        until(lambda: int(rounds.read_text() or 0) >= after + 3, "3 more rounds", 60)
    finally:
        machine.path(stop).touch()
        out, _ = caller.communicate(timeout=120)
        report.update(json.loads(out))


def assert_served_without_a_loss(machine: Machine, report: dict[str, Any]) -> None:
    counts = report["counts"]
    print(f"caller: {json.dumps(counts)}, redemptions {json.dumps(report['outcomes'])}")
    assert counts.get("ok", 0) > 0
    failures = {kind: n for kind, n in counts.items() if kind not in ("ok", "retried", "resent")}
    assert failures == {}, report["first"]
    until(
        lambda: pairctl_json(machine, "status")["gateway"]["outbox"]["pending"] == 0,
        "the gateway's outbox drained",
        60,
    )
    redeemed = set(report["redeemed"])
    assert len(redeemed) == len(report["redeemed"])
    # Every round redeemed a new invite for a new user: no other outcome, none lost.
    assert redeemed
    assert report["outcomes"] == {"redeemed": len(redeemed)}
    invite = "json_extract(payload, '$.inviteId')"
    # Invite ids grow with time: this run's are those from its first one on.
    mine = f"kind = 'invite_redeemed' AND {invite} >= '{min(redeemed)}'"
    stored = assistant_row(
        machine,
        f"SELECT count(*) AS events, count(DISTINCT {invite}) AS invites FROM events WHERE {mine}",
    )
    doubled = assistant_row(
        machine,
        "SELECT count(*) AS n FROM (SELECT 1 FROM events WHERE kind = 'invite_redeemed'"
        f" GROUP BY {invite} HAVING count(*) > 1)",
    )
    assert (stored["events"], stored["invites"], doubled["n"]) == (len(redeemed), len(redeemed), 0)


def assistant_row(machine: Machine, sql: str) -> dict[str, int]:
    params = json.dumps({"sql": sql, "mode": "query"})
    result = pairctl_json(machine, "call", "assistant", "db_proxy", params)
    row: dict[str, int] = result["rows"][0]
    return row


@contextlib.contextmanager
def changing(machine: Machine, restarted: tuple[str, ...]) -> Iterator[None]:
    """Inside: the `restarted` sides' daemons are restarted once each (one new PID, one
    start, the socket file kept); the other side's daemon is not touched."""
    before = {side: (main_pid(machine, side), socket_inode(machine, side)) for side in SIDES}
    cursor = machine.journal_cursor()
    yield
    for side in SIDES:
        watch = watched(machine, side, cursor)
        pid, inode = before[side]
        assert socket_inode(machine, side) == inode, f"{side}'s socket was made anew"
        if side in restarted:
            new_pid = main_pid(machine, side)
            assert new_pid != pid
            # One start; no process but the old and the new one logged (journald may
            # miss the unit of the old one's last lines, never add a third).
            assert watch.starts == 1, watch
            assert watch.pids <= {pid, new_pid}, watch
        else:
            assert main_pid(machine, side) == pid
            assert watch.starts == 0, watch


@dataclass
class Life:
    """The machine of a package's life and what it holds across the module's steps."""

    machine: Machine
    before: set[str]
    contact: str = ""


@pytest.fixture(scope="module")
def life(tmp_path_factory: pytest.TempPathFactory, releases: dict[str, Release]) -> Iterator[Life]:
    with booted(tmp_path_factory.mktemp("package-life")) as machine:
        machine.pairctl_path = "/usr/bin/pairctl"
        yield Life(machine, files(machine))


@contextlib.contextmanager
def booted(workdir: Path) -> Iterator[Machine]:
    reason = why_not()
    if reason is not None:
        unavailable(reason)
    machine = Machine(workdir)
    try:
        machine.boot()
        yield machine
    finally:
        machine.kill()


def test_lintian_finds_nothing_to_say_of_the_packages(releases: dict[str, Release]) -> None:
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", *releases["current"].all()],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_install_enables_the_sockets_and_the_timer_and_the_pair_serves(
    life: Life, releases: dict[str, Release]
) -> None:
    machine = life.machine
    apt_install(machine, *releases["current"].all())
    for side in SIDES:
        shown = machine.show(f"pair-{side}.socket", "ActiveState", "UnitFileState")
        assert shown == {"ActiveState": "active", "UnitFileState": "enabled"}
        # Started by its socket (the metrics timer's first run calls both), never enabled.
        service = machine.show(f"pair-{side}.service", "UnitFileState", "TriggeredBy")
        assert service == {"UnitFileState": "disabled", "TriggeredBy": f"pair-{side}.socket"}
    assert machine.show("pair-metrics.timer", "ActiveState")["ActiveState"] == "active"
    # The alert rules and the dashboard, where the README says.
    rules = machine.path("/usr/share/pair/prometheus/pair.rules.yml").read_text()
    assert "alert: PairDaemonDown" in rules
    assert machine.path("/usr/share/pair/grafana/pair.json").exists()
    current = releases["current"].version
    assert versions(machine) == {"gateway": current, "assistant": current}
    life.contact = pairctl_json(machine, "contact", "create", "Ada")["contact"]["id"]
    # A member of group pair drives it too, with the pairctl on the PATH.
    machine.run("useradd", "--no-create-home", "--groups", "pair", "ops")
    try:
        status = pairctl_json(machine, "status", user="ops")
        assert {status[side]["status"] for side in SIDES} == {"ok"}
        listed = pairctl_json(machine, "contact", "list", user="ops")
        assert [c["displayName"] for c in listed["contacts"]] == ["Ada"]
    finally:
        machine.run("userdel", "ops")


def whole_pair_to(life: Life, release: Release) -> None:
    """Both daemons' packages (and pair's) changed to `release` under the caller: each
    daemon restarted once on its socket, nothing refused, lost or doubled."""
    machine = life.machine
    with changing(machine, SIDES), calling(machine, life.contact) as report:
        apt_install(machine, *release.all())
    assert_served_without_a_loss(machine, report)
    assert versions(machine) == {"gateway": release.version, "assistant": release.version}


def test_a_downgrade_by_one_release_serves_under_a_caller(
    life: Life, releases: dict[str, Release]
) -> None:
    whole_pair_to(life, releases["previous"])


def test_the_assistant_then_the_gateway_upgrade_alone_under_a_caller(
    life: Life, releases: dict[str, Release]
) -> None:
    machine = life.machine
    current, previous = releases["current"], releases["previous"]
    with changing(machine, ("assistant",)), calling(machine, life.contact) as report:
        apt_install(machine, current.debs["pair-assistant"])
    assert_served_without_a_loss(machine, report)
    assert versions(machine) == {"gateway": previous.version, "assistant": current.version}
    with changing(machine, ("gateway",)), calling(machine, life.contact) as report:
        apt_install(machine, current.debs["pair-gateway"], current.debs["pair"])
    assert_served_without_a_loss(machine, report)
    assert versions(machine) == {"gateway": current.version, "assistant": current.version}


def test_the_whole_pair_upgrades_under_a_caller_with_each_daemon_restarted_once(
    life: Life, releases: dict[str, Release]
) -> None:
    apt_install(life.machine, *releases["previous"].all())
    whole_pair_to(life, releases["current"])


def test_remove_stops_the_daemons_and_keeps_data_key_and_user_for_the_next_install(
    life: Life, releases: dict[str, Release]
) -> None:
    machine = life.machine
    key = machine.path("/var/lib/pair/gateway.key").read_bytes()
    apt(machine, "remove", "pair", "pair-gateway", "pair-assistant")
    for side in SIDES:
        for unit in (f"pair-{side}.service", f"pair-{side}.socket"):
            assert machine.show(unit, "ActiveState")["ActiveState"] == "inactive", unit
        assert not machine.path(f"/run/pair/{side}.sock").exists()
    assert not machine.run("pgrep", "-u", "pair", check=False).stdout
    assert machine.path("/var/lib/pair/gateway.key").read_bytes() == key
    assert machine.run("getent", "passwd", "pair", check=False).returncode == 0
    apt_install(machine, *releases["current"].all())
    listed = pairctl_json(machine, "contact", "list")
    assert [c["displayName"] for c in listed["contacts"]] == ["Ada"]
    assert machine.path("/var/lib/pair/gateway.key").read_bytes() == key


def test_purge_leaves_nothing_of_ours(life: Life) -> None:
    machine = life.machine
    apt(machine, "purge", "pair", "pair-gateway", "pair-assistant")
    assert machine.run("getent", "passwd", "pair", check=False).returncode == 2
    assert machine.run("getent", "group", "pair", check=False).returncode == 2
    left = files(machine) - life.before
    assert sorted(left) == []
    assert sorted(life.before - files(machine)) == []


def test_the_package_takes_over_a_host_that_install_sh_set_up(
    tmp_path_factory: pytest.TempPathFactory, releases: dict[str, Release]
) -> None:
    with booted(tmp_path_factory.mktemp("package-takeover")) as machine:
        before = files(machine)
        install(machine)
        contact = pairctl_json(machine, "contact", "create", "Grace")["contact"]["id"]
        key = machine.path("/var/lib/pair/gateway.key").read_bytes()
        machine.pairctl_path = "/usr/bin/pairctl"
        with changing(machine, SIDES), calling(machine, contact) as report:
            apt_install(machine, *releases["current"].all())
        assert_served_without_a_loss(machine, report)
        for side in SIDES:
            for unit in (f"pair-{side}.service", f"pair-{side}.socket"):
                assert not machine.path(f"/etc/systemd/system/{unit}").exists()
                assert not machine.path(f"/etc/systemd/system/{unit}.install-sh").exists()
                fragment = machine.show(unit, "FragmentPath")["FragmentPath"]
                assert fragment == f"/lib/systemd/system/{unit}"
            socket = machine.show(f"pair-{side}.socket", "ActiveState", "UnitFileState")
            assert socket == {"ActiveState": "active", "UnitFileState": "enabled"}
            pid = main_pid(machine, side)
            cmdline = machine.path(f"/proc/{pid}/cmdline").read_bytes()
            assert f"/usr/lib/pair/{side}/current/".encode() in cmdline
        assert not machine.path("/opt/pair").exists()
        listed = pairctl_json(machine, "contact", "list")
        assert [c["displayName"] for c in listed["contacts"]] == ["Grace"]
        assert machine.path("/var/lib/pair/gateway.key").read_bytes() == key
        apt(machine, "purge", "pair", "pair-gateway", "pair-assistant")
        assert sorted(files(machine) - before) == []
