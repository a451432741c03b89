"""A foreign or hostile assistant cannot stop the gateway, nor write to the log's reader.

The real gateway runs against a lying assistant (tests/support/liar.py) from its start:
the handshake, `health` and `emit_events` answered with the wrong types, control
characters in every string, a million capabilities, garbage, silence. Whatever it
answers, the gateway keeps serving, its health says what is wrong in words, no event
is lost (delivered once the assistant is honest again, or set aside as refused), its
log holds one plain line per record, and it exits 0 on SIGTERM. pairctl, against a
lying daemon, reports an answer it cannot read in words, never with a traceback.
"""

from __future__ import annotations

import asyncio
import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pair.protocol.hello import MAX_CAPABILITIES
from pair.testing.daemons import DaemonProcess
from tests.support.ctl import pairctl
from tests.support.liar import (
    CAPABILITIES,
    HELLO,
    HONEST,
    NO_DATA,
    Answer,
    Honest,
    Liar,
    Lie,
    error,
    on,
    refusal,
    result,
)
from tests.support.waiting import until

# Far more than any line the gateway should write: a 10 MB capability list once was one.
LONGEST_LOG_LINE = 2000
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ [A-Z]+ [\w.]+: ")
# What may move a terminal's cursor, retitle it, or reorder and hide text.
ACTING = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
ESCAPES = "\x1b]0;pwned-title\x07\x1b[2J\x1b[8m\r\x9b31m\x9d0;osc\x9c\u202etxt.exe\u2066"
FORGED = "\n2026-12-07 20:00:00,000 gateway ERROR gateway.link: forged line"


def bad_status(status: Any, code: Any = "X", message: str = "x") -> Lie:
    return on("pair.hello", lambda i: error(i, {"statusCode": status, "errorCode": code}, message))


def raw(body: str) -> Lie:
    return on("pair.hello", lambda i: body.replace("ID", json.dumps(i)).encode())


def hello(**members: Any) -> Lie:
    return on("pair.hello", lambda i: result(i, {**HELLO, **members}))


def not_hello_but(discover: Callable[[Any], Answer]) -> Lie:
    """A release before pair.hello whose rpc.discover answers `discover(id)`."""

    def lie(method: str, params: Any, request_id: Any) -> Answer | Honest:
        if method == "pair.hello":
            return error(request_id, refusal("METHOD_NOT_FOUND", 404), "no", -32601)
        return discover(request_id) if method == "rpc.discover" else HONEST

    return lie


async def late(request_id: Any) -> Answer:
    """The right answer, after the gateway stopped waiting for it (1 s)."""
    await asyncio.sleep(1.5)
    return result(request_id, HELLO)


def deep(request_id: Any) -> bytes:
    levels = 100_000
    return f'{{"jsonrpc":"2.0","id":{request_id},"result":{"[" * levels}{"]" * levels}}}'.encode()


def huge_hello(request_id: Any) -> Answer:
    """A million capabilities (10 MB), the real ones first."""
    return result(
        request_id, {**HELLO, "capabilities": CAPABILITIES + [f"c{n}" for n in range(10**6)]}
    )


def escaped_hello(request_id: Any) -> Answer:
    return result(request_id, {**HELLO, "daemon": "assistantd" + FORGED, "version": ESCAPES})


@dataclass(frozen=True)
class Case:
    lie: Lie
    # Where health says it: the link ("assistant") or the delivery ("outbox").
    where: str
    states: frozenset[str]
    words: str


INCOMPATIBLE = frozenset({"incompatible"})
DOWN = frozenset({"down"})
CONNECTED = frozenset({"connected"})
UNREADABLE = "cannot be read"

CASES = {
    # The handshake refused in words: the assistant is not talked to, events wait.
    "hello_badstatus": Case(bad_status("abc"), "assistant", INCOMPATIBLE, "answered X"),
    "hello_float_status": Case(bad_status(1.5), "assistant", INCOMPATIBLE, "answered X"),
    "hello_bool_status": Case(bad_status(True), "assistant", INCOMPATIBLE, "answered X"),
    "hello_null_status": Case(bad_status(None), "assistant", INCOMPATIBLE, "answered X"),
    "hello_huge_status": Case(bad_status(10**30), "assistant", INCOMPATIBLE, "answered X"),
    "hello_list_status": Case(bad_status([500]), "assistant", INCOMPATIBLE, "answered X"),
    "hello_code_not_text": Case(bad_status(426, 7), "assistant", INCOMPATIBLE, "answered UNKNOWN"),
    "hello_code_escapes": Case(
        bad_status(426, "PROTOCOL_UNSUPPORTED" + ESCAPES), "assistant", INCOMPATIBLE, "UNKNOWN"
    ),
    "hello_message_escapes": Case(
        bad_status(400, "X", (ESCAPES + FORGED) * 10_000), "assistant", INCOMPATIBLE, "X"
    ),
    "hello_nullid_err": Case(
        on("pair.hello", lambda i: error(None, {"statusCode": "abc", "errorCode": "X"})),
        "assistant",
        INCOMPATIBLE,
        "answered X",
    ),
    "hello_refuse_meets": Case(
        on(
            "pair.hello",
            lambda i: error(
                i,
                {
                    **refusal("PROTOCOL_UNSUPPORTED", 426),
                    "protocol": {"min": 1, "max": 1},
                    "daemon": "assistantd" + ESCAPES,
                    "version": "0.2.0" + FORGED,
                },
            ),
        ),
        "assistant",
        INCOMPATIBLE,
        "answered PROTOCOL_UNSUPPORTED",
    ),
    "hello_refuse_unreadable": Case(
        on("pair.hello", lambda i: error(i, {**refusal("PROTOCOL_UNSUPPORTED"), "protocol": 7})),
        "assistant",
        INCOMPATIBLE,
        UNREADABLE,
    ),
    "hello_escape": Case(
        hello(daemon="assistantd" + FORGED, version=ESCAPES, protocol={"min": 7, "max": 9}),
        "assistant",
        INCOMPATIBLE,
        "upgrade the gateway",
    ),
    "hello_not_an_object": Case(
        on("pair.hello", lambda i: result(i, [1, 2])), "assistant", INCOMPATIBLE, UNREADABLE
    ),
    "hello_null": Case(
        on("pair.hello", lambda i: result(i, None)), "assistant", INCOMPATIBLE, UNREADABLE
    ),
    "hello_wrong_types": Case(
        hello(daemon=7, capabilities="emit_events"), "assistant", INCOMPATIBLE, UNREADABLE
    ),
    "hello_capability_not_text": Case(
        hello(capabilities=["emit_events", 1, None]), "assistant", INCOMPATIBLE, UNREADABLE
    ),
    "hello_bad_range": Case(
        hello(protocol={"min": "1", "max": [1]}), "assistant", INCOMPATIBLE, UNREADABLE
    ),
    "discover_unreadable": Case(
        not_hello_but(lambda i: result(i, {"info": "x", "methods": {"name": "emit_event"}})),
        "assistant",
        INCOMPATIBLE,
        UNREADABLE,
    ),
    "discover_badstatus": Case(
        not_hello_but(lambda i: error(i, {"statusCode": "abc", "errorCode": 5})),
        "assistant",
        INCOMPATIBLE,
        "rpc.discover answered UNKNOWN",
    ),
    # No answer to read: the link is down, and says why.
    "hello_inf": Case(
        raw(
            '{"jsonrpc":"2.0","id":ID,"error":{"code":-32000,"message":"x",'
            '"data":{"statusCode":1e400,"errorCode":"X"}}}'
        ),
        "assistant",
        DOWN,
        "protocol violation",
    ),
    "hello_data_not_an_object": Case(
        on("pair.hello", lambda i: error(i, [500, "X"])), "assistant", DOWN, "protocol violation"
    ),
    "hello_no_data": Case(
        on("pair.hello", lambda i: error(i, NO_DATA)), "assistant", DOWN, "protocol violation"
    ),
    "hello_garbage": Case(raw("\x00\x01not json"), "assistant", DOWN, "protocol violation"),
    "hello_deep": Case(on("pair.hello", deep), "assistant", DOWN | INCOMPATIBLE, ""),
    "hello_noanswer": Case(on("pair.hello", lambda i: None), "assistant", DOWN, "no answer"),
    "hello_wrongid": Case(
        on("pair.hello", lambda i: result(i + 1000, HELLO)), "assistant", DOWN, "no answer"
    ),
    "hello_late": Case(on("pair.hello", late), "assistant", DOWN, "no answer"),
    # Talked to, with what it said kept within bounds.
    "hello_huge": Case(on("pair.hello", huge_hello), "assistant", CONNECTED, ""),
    "hello_junk_capabilities": Case(
        hello(capabilities=["x" * 10_000, "emit_events" + ESCAPES, FORGED, *CAPABILITIES]),
        "assistant",
        CONNECTED,
        "",
    ),
    "hello_escaped_names": Case(on("pair.hello", escaped_hello), "assistant", CONNECTED, ""),
    "discover_escaped_names": Case(
        not_hello_but(
            lambda i: result(
                i,
                {
                    "info": {"title": "assistantd" + FORGED, "version": ESCAPES},
                    "methods": [{"name": "emit_event"}, {"name": "db_proxy" + ESCAPES}, 7],
                },
            )
        ),
        "assistant",
        CONNECTED,
        "",
    ),
    "health_badstatus": Case(
        on("health", lambda i: error(i, {"statusCode": "abc", "errorCode": "X"}, ESCAPES)),
        "assistant",
        CONNECTED,
        "health answered X",
    ),
    # Delivery refused in words: events wait, or are set aside one at a time.
    "emit_badstatus": Case(
        on("emit_events", lambda i: error(i, {"statusCode": "abc", "errorCode": "X"})),
        "outbox",
        CONNECTED,
        "X:",
    ),
    "emit_invalid": Case(
        on("emit_events", lambda i: error(i, refusal("INVALID_PARAMS"), "bad", -32602)),
        "outbox",
        CONNECTED,
        "INVALID_PARAMS",
    ),
    "emit_escapes": Case(
        on(
            "emit_events",
            lambda i: error(
                i, {"statusCode": 503, "errorCode": "BUSY", "retryable": "yes"}, ESCAPES + FORGED
            ),
        ),
        "outbox",
        CONNECTED,
        "BUSY",
    ),
}


@pytest.fixture
def liar(short_tmp: Path) -> Iterator[Liar]:
    with Liar(str(short_tmp / "liar.sock")) as liar:
        yield liar


@pytest.fixture
def gateway(short_tmp: Path, liar: Liar) -> Iterator[DaemonProcess]:
    """A real gatewayd whose assistant is the liar (not started: the lie comes first)."""
    runtime = short_tmp / "run"
    runtime.mkdir()
    daemon = DaemonProcess(
        "gateway", runtime, short_tmp / "state", "--assistant-socket", liar.socket_path
    )
    with daemon.checked():
        yield daemon


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_whatever_the_assistant_answers_the_gateway_serves_and_says_why(
    case: Case, liar: Liar, gateway: DaemonProcess
) -> None:
    """Started against the liar, the gateway serves; health says what is wrong, in plain
    words; honest again, the assistant gets every event; SIGTERM: exit 0; a plain log."""
    liar.tell(case.lie)
    gateway.start()
    created = [contact(gateway, "during the lie")]

    def said() -> bool:
        health = gateway.call("health")
        where = health[case.where]
        return health["assistant"]["state"] in case.states and case.words in str(where["lastError"])

    until(said, f"health says {sorted(case.states)} and {case.words!r}")
    health = gateway.call("health")
    assert plain(health["assistant"]), health["assistant"]
    assert plain(health["outbox"]), health["outbox"]
    assert len(health["assistant"]["capabilities"] or []) <= MAX_CAPABILITIES
    assert [c["id"] for c in gateway.call("contacts_list", {})["contacts"]] == created
    liar.tell(None)
    created.append(contact(gateway, "after the lie"))
    until(lambda: gateway.call("health")["outbox"]["pending"] == 0, "the outbox drained")
    stored = liar.stored_payloads("contactId")
    # Each event once, in order: delivered, or set aside as refused (never dropped).
    assert stored == [c for c in created if c in stored]
    assert len(stored) + gateway.call("health")["outbox"]["dead"] == len(created)
    assert gateway.stop() == 0
    assert_plain_log(gateway.stderr())


def test_a_refusal_is_never_a_compatible_assistant(liar: Liar, gateway: DaemonProcess) -> None:
    """An assistant answering PROTOCOL_UNSUPPORTED with a range that meets ours is not
    talked to: no event goes to it, health says it refused."""
    liar.tell(CASES["hello_refuse_meets"].lie)
    gateway.start()
    contact(gateway, "waits")
    until(
        lambda: gateway.call("health")["assistant"]["state"] == "incompatible",
        "the link is incompatible",
    )
    link = gateway.call("health")["assistant"]
    assert "answered PROTOCOL_UNSUPPORTED" in link["lastError"]
    assert "a peer that refuses is not talked to" in link["lastError"]
    assert liar.stored == []


def contact(gateway: DaemonProcess, name: str) -> str:
    return str(gateway.call("contacts_create", {"displayName": name})["contact"]["id"])


def plain(value: Any) -> bool:
    """No string in `value` could act on a terminal, and none is longer than a line."""
    if isinstance(value, str):
        return len(value) <= LONGEST_LOG_LINE and not any(
            unicodedata.category(ch) in ACTING for ch in value
        )
    if isinstance(value, list):
        return all(plain(item) for item in value)
    if isinstance(value, dict):
        return all(plain(item) for item in value.values())
    return True


def assert_plain_log(log: str) -> None:
    for line in log.splitlines():
        assert LOG_LINE.match(line), f"not a log record of its own: {line[:200]!r}"
        assert plain(line), f"an escape or a huge line in the log: {line[:200]!r}"


# pairctl against a lying daemon on both sockets.

DESCRIBED = {"name": "y", "summary": "s", "description": "d"}
UNREADABLE_ANSWERS = {
    "describe_without_params": (
        ("describe", "gateway", "y"),
        on("rpc.discover", lambda i: result(i, {"methods": [DESCRIBED]})),
    ),
    "methods_without_summary": (
        ("methods", "gateway"),
        on("rpc.discover", lambda i: result(i, {"methods": [{"name": "y", "params": []}]})),
    ),
    "status_without_db": (
        ("status",),
        on("health", lambda i: result(i, {"status": "ok", "pid": 1, "uptimeMs": 5})),
    ),
    "status_of_odd_types": (
        ("status",),
        on("health", lambda i: result(i, {"status": "ok", "pid": [], "uptimeMs": "x", "db": 1})),
    ),
    "contacts_not_a_list": (
        ("contact", "list"),
        on("contacts_list", lambda i: result(i, {"contacts": [7]})),
    ),
    "sql_rows_not_objects": (
        ("sql", "SELECT 1"),
        on("db_proxy", lambda i: result(i, {"rows": [[1]], "columns": ["a"]})),
    ),
    "describe_without_methods": (
        ("describe", "gateway", "y"),
        on("rpc.discover", lambda i: result(i, {"info": {}})),
    ),
    "metrics_of_another_shape": (
        ("metrics",),
        on("metrics", lambda i: result(i, {"calls": "many", "db": None})),
    ),
}


@pytest.fixture
def lying_daemons(short_tmp: Path, liar: Liar) -> Path:
    """A runtime directory whose gateway.sock and assistant.sock are both the liar."""
    runtime = short_tmp / "run"
    runtime.mkdir()
    for name in ("gateway.sock", "assistant.sock"):
        (runtime / name).symlink_to(liar.socket_path)
    return short_tmp


@pytest.mark.parametrize(
    ("args", "lie"), UNREADABLE_ANSWERS.values(), ids=UNREADABLE_ANSWERS.keys()
)
def test_pairctl_reports_an_answer_it_cannot_read_in_words(
    args: tuple[str, ...], lie: Lie, liar: Liar, lying_daemons: Path
) -> None:
    liar.tell(lie)
    shown = pairctl(lying_daemons, *args)
    assert "Traceback" not in shown.stderr
    assert shown.returncode == 1
    assert "the daemon's answer is not one this pairctl can read" in shown.stderr
    as_json = pairctl(lying_daemons, "--json", *args)
    if as_json.returncode != 0:
        assert json.loads(as_json.stdout)["errorCode"] == "INCOMPATIBLE_ANSWER"
    assert "Traceback" not in as_json.stderr


def test_pairctl_reports_an_error_no_release_sends_in_words(
    liar: Liar, lying_daemons: Path
) -> None:
    """statusCode "zz", errorCode a number, a message with escapes: exit 1, said plainly."""
    liar.tell(
        on("contacts_list", lambda i: error(i, {"statusCode": "zz", "errorCode": 9}, ESCAPES))
    )
    shown = pairctl(lying_daemons, "contact", "list")
    assert shown.returncode == 1
    assert shown.stderr.startswith("error: UNKNOWN: ")
    assert plain(shown.stderr.replace("\n", " "))
    as_json = pairctl(lying_daemons, "--json", "contact", "list")
    assert as_json.returncode == 1
    error_object = json.loads(as_json.stdout)
    assert (error_object["errorCode"], error_object["message"]) == ("UNKNOWN", ESCAPES)
    assert plain(as_json.stdout.strip())


def test_a_health_that_is_not_an_object_is_shown_as_it_came_never_a_traceback(
    liar: Liar, lying_daemons: Path
) -> None:
    liar.tell(on("health", lambda i: result(i, [1, 2])))
    shown = pairctl(lying_daemons, "status")
    assert (shown.returncode, "Traceback" in shown.stderr) == (1, False)
    assert "the daemon's answer is not one this pairctl can read" in shown.stderr
    as_json = pairctl(lying_daemons, "--json", "status")
    assert (as_json.returncode, "Traceback" in as_json.stderr) == (1, False)
    assert json.loads(as_json.stdout)["gateway"] == [1, 2]
