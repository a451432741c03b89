"""pairctl's tables read what a daemon of this release or a later one answers, show what a
daemon's callers wrote without letting it act on the terminal, and call an answer they
cannot read incompatible, in words."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest

from pair.ctl.explore import describe, methods_table, sql_result
from pair.ctl.render import as_json, contact_list, escaped, invite_created, status_table
from pair.protocol.errors import IncompatiblePeer

# Each can act on a terminal: C0 (ESC, CR, BEL, NUL, TAB, LF), DEL, C1 (CSI, OSC, ST, and
# the range's ends), the bidi overrides, embeddings, marks and isolates, and separators.
ACTING = (
    "\x00\x07\x08\t\n\r\x1b\x7f\x80\x9b\x9c\x9d\x9f\u061c\u200e\u200f\u202a\u202b"
    "\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029\ufeff\U000e0041"
)
ATTACK = "x\x1b]0;PWNED\x07\x1b[2J\x1b[8m\rroot\x9b31m\x9d0;t\x9c\u202eexe.txt\u2066"
READABLE = r"Zoë Ünal 日本語 O'Brien \ 100% <ok> 🙂"


def health(status: str, **extra: object) -> dict[str, object]:
    return {
        "status": status, "pid": 7, "uptimeMs": 61_000, "version": "0.9.0",
        "db": {"path": "/x.db", "schemaVersion": 1, "lastError": None}, **extra,
    }  # fmt: skip


def test_a_degraded_daemon_and_a_status_of_a_later_release_are_shown_as_said() -> None:
    degraded = health("degraded")
    degraded["db"] = {"path": "/x.db", "schemaVersion": 1, "lastError": "DB_FULL: disk full"}
    table = status_table({
        "assistant": degraded,
        "gateway": health("draining", aMemberOfALaterRelease=[1, 2]),
    })  # fmt: skip
    rows = table.splitlines()[1:]
    assert rows[0].split()[:4] == ["assistant", "degraded", "0.9.0", "7"]
    assert rows[0].endswith("db schema 1; db: DB_FULL: disk full")
    assert rows[1].split()[:4] == ["gateway", "draining", "0.9.0", "7"]


def test_a_daemon_that_did_not_answer_is_down() -> None:
    table = status_table({"gateway": {"status": "down", "socket": "/run/pair/gateway.sock"}})
    assert table.splitlines()[1].split()[:2] == ["gateway", "down"]


def acts(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text)


def test_every_character_that_acts_on_a_terminal_is_escaped_and_letters_are_not() -> None:
    assert not acts(escaped(ACTING))
    assert all(escaped(ch).startswith("\\") for ch in ACTING)
    assert escaped(READABLE) == READABLE
    assert escaped("a\x1bb") == "a\\u001bb"
    assert escaped(escaped(ATTACK)) == escaped(ATTACK)


def test_a_contacts_name_cannot_clear_the_screen_or_forge_a_row() -> None:
    contacts = [
        {"id": "ct_1", "displayName": ATTACK, "role": "contact", "createdAt": 0},
        {"id": "ct_2", "displayName": READABLE, "role": "x\u202e", "createdAt": 0},
    ]
    shown = contact_list({"contacts": contacts})
    assert not acts(shown.replace("\n", ""))
    assert len(shown.splitlines()) == 3
    assert READABLE in shown


def test_sql_values_and_column_names_are_escaped() -> None:
    column = "v\x1b[2J\u202e"
    shown = sql_result({"columns": [column, "n"], "rows": [{column: ATTACK, "n": 1}]})
    assert not acts(shown.replace("\n", ""))
    assert shown.splitlines()[-1] == "1 row"
    created = invite_created({
        "code": "123456", "invite": {"id": "iv\n", "contactId": "ct\x9b", "sourceChannel": "s",
                                     "maxUses": 1, "expiresAt": None},
    })  # fmt: skip
    assert not acts(created.replace("\n", ""))
    assert len(created.splitlines()) == 3


def test_json_output_escapes_what_acts_and_reads_back_as_the_same_value() -> None:
    value = {"a": ATTACK, ACTING: [READABLE, 1.5, None]}
    text = as_json(value)
    assert not acts(text.replace("\n", ""))
    assert json.loads(text) == value
    assert READABLE.replace("\\", "\\\\") in text


def method(**members: Any) -> dict[str, Any]:
    return {"name": "y", "summary": "s", "description": "d", **members}


UNREADABLE = {
    "health without db": lambda: status_table({"gateway": {"status": "ok", "pid": 1}}),
    "health of odd types": lambda: status_table(
        {"gateway": {"status": "ok", "pid": 1, "uptimeMs": "x", "db": 1}}
    ),
    "a method without params": lambda: describe({}, method(result={"schema": {}})),
    "a method without result": lambda: describe({}, method(params=[])),
    "params that are no list": lambda: describe({}, method(params=7, result={"schema": {}})),
    "methods without summary": lambda: methods_table({"gateway": {"methods": [{"name": "y"}]}}),
    "rows that are no objects": lambda: sql_result({"columns": ["a"], "rows": [[1]]}),
    "contacts that are no objects": lambda: contact_list({"contacts": [7]}),
}


@pytest.mark.parametrize("render", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_an_answer_pairctl_cannot_read_is_an_incompatible_answer_in_words(render: Any) -> None:
    with pytest.raises(IncompatiblePeer, match="not one this pairctl can read"):
        render()
