"""Log records to journald in its native protocol (`--log-format journal`).

Through stderr every line reaches the journal as PRIORITY=6 with its fields as text
inside MESSAGE. Sent natively, a record keeps its priority (`journalctl -p
warning`) and its fields (`journalctl PAIR_DAEMON=gateway`, `LOGGER=`,
`CODE_FUNC=`, and a traced call's `TRACE_ID=`). In-house for the reason
runtime/systemd.py gives: the protocol is a datagram of `KEY=value` lines (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/).
"""

from __future__ import annotations

import logging
import socket
import struct

from pair.protocol.trace import record_span

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# A datagram must fit the socket's send buffer; a longer message is cut here.
MAX_MESSAGE_BYTES = 48 * 1024

_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7


def priority(levelno: int) -> int:
    """syslog's priority for a logging level."""
    for level, value in _PRIORITIES:
        if levelno >= level:
            return value
    return _DEBUG_PRIORITY


def encode(fields: dict[str, str]) -> bytes:
    """Fields as one native-protocol datagram (a value with a newline is length-framed)."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each record to journald; `OSError` from the constructor when it is not there."""

    def __init__(self, identifier: str, daemon: str, address: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.connect(address)
        except OSError:
            self._socket.close()
            raise
        self._fixed = {"SYSLOG_IDENTIFIER": identifier, "PAIR_DAEMON": daemon}
        self._exceptions = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self._exceptions.formatException(record.exc_info)
            fields = {
                "MESSAGE": _cut(message),
                "PRIORITY": str(priority(record.levelno)),
                "LOGGER": record.name,
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
                **self._fixed,
            }
            span = record_span(record)
            if span is not None:
                fields["TRACE_ID"] = span.trace_id
                fields["SPAN_ID"] = span.span_id
            self._socket.send(encode(fields))
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._socket.close()
        super().close()


def _cut(message: str) -> str:
    data = message.encode("utf-8", "replace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    cut = data[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore")
    return f"{cut}... [{len(data) - MAX_MESSAGE_BYTES} more bytes cut]"
