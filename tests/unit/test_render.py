"""pairctl's tables read what a daemon of this release or a later one answers."""

from __future__ import annotations

from pair.ctl.render import status_table


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
    assert rows[0].split()[:3] == ["assistant", "degraded", "7"]
    assert rows[0].endswith("db schema 1; db: DB_FULL: disk full")
    assert rows[1].split()[:3] == ["gateway", "draining", "7"]


def test_a_daemon_that_did_not_answer_is_down() -> None:
    table = status_table({"gateway": {"status": "down", "socket": "/run/pair/gateway.sock"}})
    assert table.splitlines()[1].split()[:2] == ["gateway", "down"]
