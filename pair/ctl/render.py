"""Human output of pairctl: short lines and aligned tables, never a hash or a key.

What a daemon answers is the daemon's to say, and whoever can call it (a
contact's name, a row of `db_proxy`) may put terminal escapes in it: every
string pairctl prints from an answer goes through `escaped`, in human output
and in `--json` alike. An answer this pairctl cannot read (a member missing,
a wrong type) is an `IncompatiblePeer` with words (`reads_answer`), never a
traceback.
"""

from __future__ import annotations

import datetime
import functools
import json
import unicodedata
from collections.abc import Callable
from typing import Any, ParamSpec

from pair.protocol.errors import IncompatiblePeer

P = ParamSpec("P")

# Escaped: controls (C0 with ESC, CR and BEL, DEL, C1 with CSI and OSC), format
# characters (the bidi overrides and isolates, zero-width ones) and the line and
# paragraph separators. They move the cursor, retitle the window or reorder and hide
# text. Spaces and every letter (é, 日本) are shown as they are; a backslash is not
# escaped, so that paths and patterns stay readable (output for eyes, not a codec).
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# JSON's own short escapes; any other escaped character is \uXXXX, so that one escape
# serves both human output and --json (where it is valid JSON for the same string).
_SHORT = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
# How much of an unreadable answer's error the words about it carry.
WHY_CHARS = 120


def escaped(text: str) -> str:
    """`text` with every character that could act on a terminal written as an escape."""
    if text.isprintable():
        return text
    return "".join(_escape(ch) if _acts(ch) else ch for ch in text)


def _acts(ch: str) -> bool:
    return not ch.isprintable() and unicodedata.category(ch) in _ESCAPED_CATEGORIES


def _escape(ch: str) -> str:
    short = _SHORT.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    high, low = divmod(code - 0x10000, 0x400)
    return f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"


def as_json(result: Any) -> str:
    """`result` as indented JSON, letters as they are and the rest escaped. json.dumps
    escapes C0 itself; the newlines left are the indentation's, so each line is
    escaped on its own."""
    text = json.dumps(result, indent=2, ensure_ascii=False)
    return "\n".join(escaped(line) for line in text.split("\n"))


def reads_answer(render: Callable[P, str]) -> Callable[P, str]:
    """`render`, with an answer it cannot read (of another release, or a liar's) an
    `IncompatiblePeer` saying so (pairctl reports it, exit 1), never a traceback."""

    @functools.wraps(render)
    def reading(*args: P.args, **kwargs: P.kwargs) -> str:
        try:
            return render(*args, **kwargs)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise IncompatiblePeer(
                f"the daemon's answer is not one this pairctl can read ({_why(exc)});"
                " --json shows it as it came"
            ) from exc

    return reading


def _why(exc: Exception) -> str:
    why = f"no member {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
    return why if len(why) <= WHY_CHARS else why[: WHY_CHARS - 3] + "..."


def status_of(health: Any) -> str:
    """A daemon's `status` as said, or what an unreadable health is."""
    status = health.get("status") if isinstance(health, dict) else None
    return status if isinstance(status, str) else "unreadable"


def when(epoch_ms: int | None) -> str:
    if epoch_ms is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(epoch_ms / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def duration(ms: int) -> str:
    seconds = ms // 1000
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "(none)"
    header = [escaped(str(cell)) for cell in header]
    rows = [[escaped(str(cell)) for cell in row] for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


@reads_answer
def contact_created(result: Any) -> str:
    contact = result["contact"]
    return escaped(f"contact {contact['id']} ({contact['displayName']}, {contact['role']})")


@reads_answer
def contact_list(result: Any) -> str:
    rows = [
        [c["id"], c["displayName"], c["role"], when(c["createdAt"])] for c in result["contacts"]
    ]
    return table(["ID", "NAME", "ROLE", "CREATED"], rows)


@reads_answer
def deleted(result: Any) -> str:
    return "deleted" if result.get("deleted") else as_json(result)


@reads_answer
def invite_created(result: Any) -> str:
    invite = result["invite"]
    uses = "1 use" if invite["maxUses"] == 1 else f"{invite['maxUses']} uses"
    return lines(
        f"invite {invite['id']} for {invite['contactId']} on {invite['sourceChannel']}",
        f"code {result['code']} ({uses}, expires {when(invite['expiresAt'])})",
        "the code is shown only now",
    )


@reads_answer
def redemption(result: Any) -> str:
    return escaped(
        f"{result['outcome']}: invite {result['inviteId']}, contact {result['contactId']},"
        f" channel {result['channelId']}"
    )


@reads_answer
def invite_revoked(result: Any) -> str:
    invite = result["invite"]
    return escaped(f"invite {invite['id']} is {invite['status']}")


def lines(*texts: str) -> str:
    """Lines of output, each escaped (so none of them can hold a second line)."""
    return "\n".join(escaped(text) for text in texts)


@reads_answer
def invite_list(result: Any) -> str:
    rows = [
        [
            i["id"],
            i["sourceChannel"],
            i["contactId"],
            i["status"],
            f"{i['useCount']}/{i['maxUses']}",
            when(i["expiresAt"]),
        ]
        for i in result["invites"]
    ]
    return table(["ID", "CHANNEL", "CONTACT", "STATUS", "USES", "EXPIRES"], rows)


@reads_answer
def status_table(healths: dict[str, Any]) -> str:
    rows = []
    for name, health in healths.items():
        if health.get("status") == "forbidden":
            rows.append([name, "forbidden", "-", "-", "-", health["error"]])
            continue
        if health.get("status") == "down":
            rows.append([name, "down", "-", "-", "-", f"no answer on {health['socket']}"])
            continue
        details = f"db schema {health['db']['schemaVersion']}"
        if "assistant" in health:
            link, outbox, migrations = health["assistant"], health["outbox"], health["migrations"]
            details = (
                f"assistant link {link['state']}, outbox {outbox['pending']},"
                f" migrations pending {migrations['pending']} failed {migrations['failed']}"
            )
        if health["db"].get("lastError"):
            details += f"; db: {health['db']['lastError']}"
        uptime = duration(health["uptimeMs"])
        # "degraded", or a status a later release adds: shown as the daemon says it.
        state = "up" if health.get("status") == "ok" else str(health.get("status"))
        release = str(health.get("version", "-"))
        rows.append([name, state, release, str(health["pid"]), uptime, details])
    return table(["DAEMON", "STATE", "VERSION", "PID", "UPTIME", "DETAILS"], rows)
