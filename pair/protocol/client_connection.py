"""One connection of a `client.Client`: frames in, its end reported, its write pauses."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import cast

import msgspec

from pair.protocol.errors import FrameError
from pair.protocol.framing import FrameDecoder

_UCRED = struct.Struct("3i")


class ClientConnection(asyncio.Protocol):
    """One connection of a `Client`: frames in to `on_frame`, its end to `on_failure`."""

    def __init__(
        self,
        max_frame_bytes: int,
        on_frame: Callable[[ClientConnection, bytes], None],
        on_failure: Callable[[ClientConnection, str], None],
    ) -> None:
        self._on_frame = on_frame
        self._on_failure = on_failure
        self._decoder = FrameDecoder(max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.can_write = asyncio.Event()
        self.can_write.set()
        # The ids of each batch sent on this connection, newest last.
        self.batches: list[list[int]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)

    def peer_uid(self) -> int:
        """The uid of the process at the other end, as the kernel says (SO_PEERCRED)."""
        assert self.transport is not None, "asked once connected"
        sock = self.transport.get_extra_info("socket")
        _, uid, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        return int(uid)

    def data_received(self, data: bytes) -> None:
        try:
            for body in self._decoder.feed(data):
                self._on_frame(self, body)
        except (FrameError, msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            self._on_failure(self, f"protocol violation by the peer: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed by the peer"
        self._on_failure(self, reason)
        if not self.lost.done():
            self.lost.set_result(None)
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()
