"""How pairctl reports a failed call: in its own words, with the daemon's errorCode kept.

Exit codes (pair.runtime.errors): 1 the daemon answered an error, or an answer this
pairctl cannot read (INCOMPATIBLE_ANSWER: another release's, or a liar's); 2 usage;
66 (EX_NOINPUT) no such bundle or state directory; 69 (EX_UNAVAILABLE) it could not be
reached; 73 (EX_CANTCREAT) an output file cannot be written; 75 (EX_TEMPFAIL) a daemon
or a restore is in the way; 77 (EX_NOPERM) this user may not use the socket. With `--json` the
error is also one JSON object on stdout: `code` (JSON-RPC's, null when there was
no answer), `errorCode`, `message`, `data`. Every line goes through `render.escaped`:
a daemon's words may hold terminal escapes.
"""

from __future__ import annotations

import grp
import json
import os
import re
import sys
from typing import Any

from pair.ctl.render import escaped
from pair.protocol.errors import Forbidden, IncompatiblePeer, IpcHandlerError, IpcTransportError
from pair.runtime.errors import (
    EX_HANDLER,
    EX_NOPERM,
    EX_UNAVAILABLE,
    EX_USAGE,
)

# The flag that sets each param of pairctl's commands.
FLAGS = {
    "$.code": "--code",
    "$.ttlSeconds": "--ttl",
    "$.maxUses": "--max-uses",
    "$.sourceChannel": "--channel",
    "$.contactId": "--contact",
    "$.externalUserId": "--external-user-id",
    "$.externalChatId": "--external-chat-id",
    "$.note": "--note",
    "$.displayName": "NAME",
    "$.role": "--role",
    "$.maxRows": "--max-rows",
    "$.bind": "--bind",
}
# A pattern's rule in words; other rules are the daemon's own (`>= 1`, `length <= 200`).
PATTERNS = {
    "$.code": "6 digits",
    "$.sourceChannel": "1-32 of a-z, 0-9, _ and -",
    "$.role": "a-z, then up to 31 of a-z, 0-9, _ and -",
}
# The daemon's words for a wire param, as pairctl's flag (not for `pairctl call`,
# whose caller wrote the wire params).
_WIRE_WORDS = {
    "use mode=run": "use --write",
    "(use mode=exec for a script)": "(a script: pairctl call assistant db_proxy, mode exec)",
    "externalUserId or externalChatId": "--external-user-id or --external-chat-id",
    "before maxRows or maxBytes stops them; ask for fewer rows or a smaller maxBytes": (
        "before --max-rows stops them; ask for fewer rows"
    ),
}
_TYPES = {"int": "a whole number", "str": "text", "bool": "true or false", "float": "a number"}
_EXPECTED = re.compile(r"Expected `(\w+)`(?: (.*?))? - at `")


def forbidden(exc: IpcHandlerError | IpcTransportError) -> str | None:
    """Why this user may not use the socket, when that is why the call failed."""
    if isinstance(exc, IpcHandlerError):
        return exc.message if exc.code == "FORBIDDEN" else None
    if not isinstance(exc.__cause__, PermissionError) or exc.path is None:
        return None
    return f"permission denied on {exc.path}: run as root or as a member of {_group_of(exc.path)}"


def _group_of(path: str) -> str:
    try:
        return f"group {grp.getgrgid(os.stat(path).st_gid).gr_name}"
    except (OSError, KeyError):
        return "the socket's group"


def report(exc: IpcHandlerError | IpcTransportError, as_json: bool, *, wire: bool = False) -> int:
    """Print why the call failed (stderr; stdout too with --json); the exit code. `wire`:
    the caller wrote the call's params itself (`pairctl call`): its words are the wire's."""
    refusal = forbidden(exc)
    if refusal is not None:
        code, error = EX_NOPERM, _error(Forbidden.code, "FORBIDDEN", refusal, {})
        lines = [f"error: FORBIDDEN: {refusal}"]
    elif isinstance(exc, IpcHandlerError):
        code, error = EX_HANDLER, _error(exc.rpc_code, exc.code, exc.message, exc.data)
        lines = _handler_lines(exc, wire)
    elif isinstance(exc, IncompatiblePeer):
        code, error = EX_HANDLER, _error(None, "INCOMPATIBLE_ANSWER", exc.message, {})
        lines = [f"pairctl: {exc.message}"]
    else:
        data = {"socket": exc.path, "sent": exc.sent}
        code, error = EX_UNAVAILABLE, _error(None, "UNAVAILABLE", exc.message, data)
        lines = [
            f"pairctl: {exc.message}",
            "  start the pair with `make run` or `pairctl up`, or under systemd:"
            " systemctl start pair-assistant.socket pair-gateway.socket",
        ]
    emit(error, lines, as_json)
    return code


def usage(message: str, as_json: bool) -> int:
    emit(_error(None, "USAGE", message, {}), [f"pairctl: {message}"], as_json)
    return EX_USAGE


def failed(message: str, error_code: str, code: int, as_json: bool) -> int:
    """A failure of pairctl's own (no daemon answered it): `error_code` names its kind."""
    emit(_error(None, error_code, message, {}), [f"pairctl: {message}"], as_json)
    return code


def emit(error: dict[str, Any], lines: list[str], as_json: bool) -> None:
    for line in lines:
        print(escaped(line), file=sys.stderr)
    if as_json:
        print(escaped(json.dumps(error, ensure_ascii=False)))


def _error(rpc_code: int | None, error_code: str, message: str, data: Any) -> dict[str, Any]:
    return {"code": rpc_code, "errorCode": error_code, "message": message, "data": data}


def _handler_lines(exc: IpcHandlerError, wire: bool) -> list[str]:
    path = exc.data.get("path")
    if wire:
        return [f"error: {exc.code}: {exc.message}", *([f"  at {path}"] if path else [])]
    rule = _rule(path, exc.message) if exc.code == "INVALID_PARAMS" and path else None
    if rule is not None:
        return [f"error: {exc.code}: {rule}", f"  the daemon said: {exc.message}"]
    message = exc.message
    for said, words in _WIRE_WORDS.items():
        message = message.replace(said, words)
    lines = [f"error: {exc.code}: {message}"]
    if path:
        flag = FLAGS.get(path)
        lines.append(f"  at {path} ({flag})" if flag else f"  at {path}")
    return lines


def _rule(path: str, message: str) -> str | None:
    """`--ttl must be a whole number >= 1` for the daemon's `Expected `int` >= 1 - at
    `$.ttlSeconds``; None when the param is not a flag's or the message not a type's."""
    flag, expected = FLAGS.get(path), _EXPECTED.match(message)
    if flag is None or expected is None:
        return None
    kind, constraint = expected.groups()
    if constraint and constraint.startswith("matching regex") and path in PATTERNS:
        return f"{flag} must be {PATTERNS[path]}"
    words = _TYPES.get(kind, kind)
    return f"{flag} must be {words} {constraint}" if constraint else f"{flag} must be {words}"
