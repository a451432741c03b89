"""pairctl as an operator uses it: real commands against real daemons, real exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pair import __version__ as RELEASE
from pair.protocol.errors import IpcHandlerError
from pair.testing import Pair
from tests.support.ctl import json_of, pairctl
from tests.support.raw import RawConnection
from tests.support.waiting import until


def test_a_contact_an_invite_and_its_redemption_from_the_shell(pair: Pair) -> None:
    contact = json_of(pairctl(pair, "contact", "create", "Dana", "--json"))["contact"]
    assert isinstance(contact, dict)
    created = pairctl(pair, "invite", "create", "--contact", str(contact["id"]), "--channel", "sms")
    assert created.returncode == 0
    code = next(line.split()[1] for line in created.stdout.splitlines() if line.startswith("code "))
    redeemed = pairctl(
        pair,
        "invite",
        "redeem",
        "--channel",
        "sms",
        "--code",
        code,
        "--external-user-id",
        "+15550100",
    )
    assert redeemed.returncode == 0
    assert redeemed.stdout.startswith("redeemed: invite ")
    listing = pairctl(pair, "invite", "list", "--channel", "sms")
    assert "redeemed" in listing.stdout
    assert code not in listing.stdout
    assert "Dana" in pairctl(pair, "contact", "list").stdout


def test_status_shows_both_daemons_their_release_and_the_link(pair: Pair) -> None:
    result = pairctl(pair, "status")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["DAEMON", "STATE", "VERSION", "PID", "UPTIME", "DETAILS"]
    assert lines[1].split()[:4] == ["assistant", "up", RELEASE, str(pair.assistant.pid)]
    assert "assistant link connected" in lines[2]


def test_call_prints_the_result_as_json_and_takes_a_batch(pair: Pair, tmp_path: Path) -> None:
    result = json_of(
        pairctl(
            pair, "call", "assistant", "db_proxy", '{"sql": "SELECT 1 AS one", "mode": "query"}'
        )
    )
    assert result["rows"] == [{"one": 1}]
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([{"method": "health"}, {"method": "nope"}]))
    answered = pairctl(pair, "call", "gateway", "--batch", str(batch))
    assert answered.returncode == 1
    outcomes = json.loads(answered.stdout)
    assert outcomes[0]["result"]["status"] == "ok"
    assert outcomes[1]["error"]["errorCode"] == "METHOD_NOT_FOUND"


@pytest.mark.parametrize(
    ("args", "code", "stderr"),
    [
        (
            ("invite", "redeem", "--channel", "sms", "--code", "000000", "--external-user-id", "x"),
            1,
            "error: INVITE_INVALID",
        ),
        (("invite", "create", "--contact", "ct_none", "--channel", "sms"), 1, "error: NOT_FOUND"),
        (
            ("invite", "create", "--contact", "c", "--channel", "S M S"),
            1,
            "error: INVALID_PARAMS: --channel must be 1-32 of a-z, 0-9, _ and -",
        ),
        (
            ("invite", "create", "--contact", "c", "--channel", "sms", "--ttl", "-5"),
            1,
            "error: INVALID_PARAMS: --ttl must be a whole number >= 1",
        ),
        (
            ("invite", "redeem", "--channel", "sms", "--code", "abc"),
            1,
            "error: INVALID_PARAMS: --code must be 6 digits",
        ),
        (("call", "gateway", "health", "{not json"), 2, "params are not valid JSON"),
        (("call", "gateway", "health", "7"), 2, "must be a JSON object or array"),
        (("invite", "frobnicate"), 2, "invalid choice"),
        (("call", "gateway"), 2, "call needs a METHOD"),
    ],
)
def test_errors_exit_with_their_kind_and_no_traceback(
    pair: Pair, args: tuple[str, ...], code: int, stderr: str
) -> None:
    result = pairctl(pair, *args)
    assert result.returncode == code
    assert stderr in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_daemon_is_exit_69_naming_the_socket(short_tmp: Path) -> None:
    result = pairctl(short_tmp, "contact", "list")
    assert result.returncode == 69
    assert str(short_tmp / "run" / "gateway.sock") in result.stderr
    assert "pairctl up" in result.stderr
    assert "Traceback" not in result.stderr
    assert pairctl(short_tmp, "status").returncode == 69


def health_pid(socket_path: Path) -> int | None:
    try:
        with RawConnection(str(socket_path), timeout=1) as conn:
            return int(conn.call({"jsonrpc": "2.0", "id": 1, "method": "health"})["result"]["pid"])
    except (OSError, EOFError):
        return None


def test_up_runs_both_restarts_a_killed_one_and_stops_cleanly(short_tmp: Path) -> None:
    log = (short_tmp / "up.log").open("w")
    up = subprocess.Popen(
        [sys.executable, "-m", "pair.ctl", "--runtime-dir", str(short_tmp / "run"),
         "--state-dir", str(short_tmp / "state"), "up"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assistant_sock, gateway_sock = (
        short_tmp / "run" / "assistant.sock",
        short_tmp / "run" / "gateway.sock",
    )
    try:
        until(lambda: bool(health_pid(assistant_sock) and health_pid(gateway_sock)), "both up")
        first = health_pid(assistant_sock)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        until(lambda: health_pid(assistant_sock) not in (None, first), "the assistant again")
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.kill()
        log.close()
    output = (short_tmp / "up.log").read_text()
    assert "assistant died (signal 9); restarting" in output
    assert "assistant | " in output
    assert "gateway   | " in output
    assert "gateway stopped (exit 0)" in output
    assert "assistant stopped (exit 0)" in output
    assert health_pid(assistant_sock) is None
    assert health_pid(gateway_sock) is None


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition, parsed by prometheus-client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_count_calls_outcomes_durations_and_redemptions(pair: Pair) -> None:
    for _ in range(3):
        pair.gateway.call("health")
    contact = pair.gateway.call("contacts_create", {"displayName": "M"})["contact"]
    invite = pair.gateway.call(
        "invites_create", {"contactId": contact["id"], "sourceChannel": "sms"}
    )
    redeem = {"sourceChannel": "sms", "code": invite["code"], "externalUserId": "u1"}
    assert pair.gateway.call("invites_redeem", redeem)["outcome"] == "redeemed"
    assert pair.gateway.call("invites_redeem", redeem)["outcome"] == "already_member"
    with pytest.raises(IpcHandlerError):
        pair.gateway.call("contacts_get", {"id": "missing"})
    with pytest.raises(IpcHandlerError):
        pair.assistant.call("db_proxy", {"sql": "SELECT * FROM nowhere", "mode": "query"})
    with RawConnection(pair.gateway_socket) as raw:
        # A failed notification gets no answer but is counted; the call behind it on the
        # same connection is read after it.
        raw.send_json({"jsonrpc": "2.0", "method": "nope"})
        assert raw.call({"jsonrpc": "2.0", "id": 1, "method": "pid"}).get("error")
    result = pairctl(pair, "metrics")
    assert result.returncode == 0, result.stderr
    samples = samples_of(result.stdout)
    assert sample(samples, "pair_up", daemon="assistant") == 1
    assert sample(samples, "pair_up", daemon="gateway") == 1
    gateway_health = {"daemon": "gateway", "method": "health"}
    assert sample(samples, "pair_calls_total", outcome="ok", **gateway_health) == 3
    assert sample(samples, "pair_call_duration_seconds_count", **gateway_health) == 3
    assert sample(samples, "pair_call_duration_seconds_bucket", le="+Inf", **gateway_health) == 3
    assert sample(samples, "pair_call_duration_seconds_sum", **gateway_health) > 0
    not_found = {"daemon": "gateway", "method": "contacts_get", "outcome": "NOT_FOUND"}
    assert sample(samples, "pair_calls_total", **not_found) == 1
    unknown = {"daemon": "gateway", "method": "(unknown)", "outcome": "METHOD_NOT_FOUND"}
    assert sample(samples, "pair_calls_total", **unknown) == 2
    failed = {"daemon": "assistant", "method": "db_proxy", "outcome": "DB_PROXY_FAILED"}
    assert sample(samples, "pair_calls_total", **failed) == 1
    assert sample(samples, "pair_invite_redemptions_total", outcome="redeemed") == 1
    assert sample(samples, "pair_invite_redemptions_total", outcome="already_member") == 1
    assert sample(samples, "pair_connections_refused_total", daemon="gateway", reason="limit") == 0
    assert sample(samples, "pair_outbox_dead") == 0
    assert sample(samples, "pair_outbox_oldest_age_seconds") >= 0


def test_metrics_of_a_daemon_that_is_down_say_so_and_exit_zero(pair: Pair, tmp_path: Path) -> None:
    pair.assistant.stop()
    textfile = tmp_path / "pair.prom"
    result = pairctl(pair, "metrics", "--textfile", str(textfile))
    assert result.returncode == 0, result.stderr
    assert "assistant" in result.stderr
    samples = samples_of(textfile.read_text())
    assert sample(samples, "pair_up", daemon="assistant") == 0
    assert sample(samples, "pair_up", daemon="gateway") == 1
    assert [path.name for path in tmp_path.iterdir()] == ["pair.prom"], "a temporary file was left"


def test_a_textfile_that_cannot_be_written_is_one_line_and_exit_73(
    pair: Pair, tmp_path: Path
) -> None:
    missing = tmp_path / "missing" / "pair.prom"
    result = pairctl(pair, "metrics", "--textfile", str(missing))
    assert result.returncode == 73
    assert result.stderr == f"pairctl: cannot write {missing}: No such file or directory\n"


def test_the_textfile_replaces_a_planted_link_and_never_writes_through_it(
    pair: Pair, tmp_path: Path
) -> None:
    """The metrics directory is the daemon user's (SECURITY-REVIEW-3 #17a): a link put
    where the textfile goes is replaced, its target left alone; the file is 0644 for
    node_exporter."""
    victim = tmp_path / "victim"
    victim.write_text("root's\n")
    textfile = tmp_path / "pair.prom"
    textfile.symlink_to(victim)
    result = pairctl(pair, "metrics", "--textfile", str(textfile))
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "root's\n"
    assert not textfile.is_symlink()
    assert (textfile.stat().st_mode & 0o777) == 0o644
    assert sample(samples_of(textfile.read_text()), "pair_up", daemon="gateway") == 1
