"""Human output of pairctl: short lines and aligned tables, never a hash or a key."""

from __future__ import annotations

import datetime
import json
from typing import Any


def as_json(result: Any) -> str:
    return json.dumps(result, indent=2, ensure_ascii=False)


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
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def contact_created(result: Any) -> str:
    contact = result["contact"]
    return f"contact {contact['id']} ({contact['displayName']}, {contact['role']})"


def contact_list(result: Any) -> str:
    rows = [
        [c["id"], c["displayName"], c["role"], when(c["createdAt"])] for c in result["contacts"]
    ]
    return table(["ID", "NAME", "ROLE", "CREATED"], rows)


def deleted(result: Any) -> str:
    return "deleted" if result.get("deleted") else as_json(result)


def invite_created(result: Any) -> str:
    invite = result["invite"]
    uses = "1 use" if invite["maxUses"] == 1 else f"{invite['maxUses']} uses"
    return (
        f"invite {invite['id']} for {invite['contactId']} on {invite['sourceChannel']}\n"
        f"code {result['code']} ({uses}, expires {when(invite['expiresAt'])})\n"
        "the code is shown only now"
    )


def redemption(result: Any) -> str:
    return (
        f"{result['outcome']}: invite {result['inviteId']}, contact {result['contactId']},"
        f" channel {result['channelId']}"
    )


def invite_revoked(result: Any) -> str:
    invite = result["invite"]
    return f"invite {invite['id']} is {invite['status']}"


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


def status_table(healths: dict[str, Any]) -> str:
    rows = []
    for name, health in healths.items():
        if health.get("status") == "forbidden":
            rows.append([name, "forbidden", "-", "-", health["error"]])
            continue
        if health.get("status") == "down":
            rows.append([name, "down", "-", "-", f"no answer on {health['socket']}"])
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
        rows.append([name, state, str(health["pid"]), uptime, details])
    return table(["DAEMON", "STATE", "PID", "UPTIME", "DETAILS"], rows)
