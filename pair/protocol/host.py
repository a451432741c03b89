"""What a connection needs of the server that accepted it: its limits (PROTOCOL.md's
defaults, each a flag of the daemons) and its share of the byte budgets."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pair.protocol.errors import RpcError
from pair.protocol.framing import DEFAULT_FRAME_TIMEOUT, DEFAULT_MAX_FRAME_BYTES

if TYPE_CHECKING:
    from pair.protocol.calls import Calls
    from pair.protocol.connection import Connection

DEFAULT_IDLE_TIMEOUT = 600.0
# Request bodies held in memory: those of the calls in flight (their
# parameters live as long as the call) and of the frames being received (a
# frame's declared length is reserved when it is admitted). Past these a
# connection, or every connection, is not read until calls end; a frame
# already admitted is always read to its end, so nothing waits on itself.
DEFAULT_MAX_PENDING_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PENDING_BYTES_TOTAL = 128 * 1024 * 1024

DEFAULT_MAX_UNSENT_BYTES = 4 * 1024 * 1024
# Answers written but not read by the peer past which its calls still running in a
# thread are withdrawn (ANSWERS_UNREAD).
DEFAULT_MAX_UNREAD_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Per-server tunables; the defaults are PROTOCOL.md's."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT
    max_in_flight: int = 256
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    max_pending_bytes_total: int = DEFAULT_MAX_PENDING_BYTES_TOTAL
    max_batch: int = 1000
    max_connections: int = 2048
    grace: float = 10.0
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    backlog: int = socket.SOMAXCONN
    # Answers encoded in one turn of the loop past which a connection's other frames
    # wait for them to be written (with the transport's own high-water mark, how a
    # peer that does not read stops being served).
    max_unsent_bytes: int = DEFAULT_MAX_UNSENT_BYTES
    max_unread_bytes: int = DEFAULT_MAX_UNREAD_BYTES


class CallHost(Protocol):
    """What a connection needs of the server that accepted it."""

    limits: ServerLimits
    log: logging.Logger
    calls: Calls
    pending_bytes: int

    def admit(self, connection: Connection, transport: asyncio.Transport) -> RpcError | None:
        """Register the connection; the reason to refuse it (then closed), or None."""

    def connection_lost(self, connection: Connection) -> None: ...

    def heard_from(self, connection: Connection) -> None:
        """The connection's first bytes arrived."""

    def call_started(self, size: int) -> None:
        """A call whose request body is `size` bytes is in flight."""

    def call_finished(self, size: int) -> None: ...

    def hold(self, size: int) -> None:
        """`size` more bytes of a frame being received are reserved (fewer, when negative)."""

    def may_read(self, connection: Connection) -> bool:
        """False while the bodies of the daemon's calls in flight are over its budget; the
        connection is then resumed (`update_reading`) once they are not."""
