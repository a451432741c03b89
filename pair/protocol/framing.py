"""Length-prefixed frames: a uint32 big-endian length, then that many body bytes.

Reading a stream apart into frame bodies (`FrameDecoder`), and writing a message as
one frame of JSON (`encode_frame_of`, `append_frame_of`, msgspec's encoder). Nothing
here knows about sockets or JSON-RPC.
"""

from __future__ import annotations

import struct

import msgspec

from pair.protocol.errors import FrameTooLarge, InvalidFrame

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
DEFAULT_FRAME_TIMEOUT = 10.0

_unpack_header = HEADER.unpack_from
_encoder = msgspec.json.Encoder()


def encode_frame_of(message: object) -> bytes:
    """One frame holding `message` as JSON, as bytes (uvloop writes bytes without a copy)."""
    body = _encoder.encode(message)
    return _pack_header(len(body)) + body


def append_frame_of(message: object, buffer: bytearray) -> None:
    """Encode `message` as one more frame at the end of `buffer`, in place.

    On an encoding error the buffer is left as it was.
    """
    start = len(buffer)
    buffer.extend(_NO_LENGTH)
    try:
        _encoder.encode_into(message, buffer, start + HEADER.size)
    except BaseException:
        del buffer[start:]
        raise
    HEADER.pack_into(buffer, start, len(buffer) - start - HEADER.size)


_NO_LENGTH = bytes(HEADER.size)
_pack_header = HEADER.pack


class FrameDecoder:
    """Splits a byte stream into frame bodies, several per chunk when they are there.

    A length is validated as soon as its four bytes arrive, before any body
    byte is buffered, so a hostile prefix never makes us allocate.
    """

    __slots__ = ("_buffer", "_need", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        # Bytes the buffer must hold before parsing can make progress; lets a
        # large frame arriving in many chunks be appended, not re-parsed.
        self._need = HEADER_SIZE

    @property
    def has_partial(self) -> bool:
        """True while part of a frame (even part of its header) is buffered."""
        return bool(self._buffer)

    @property
    def partial_length(self) -> int:
        """The declared body length of the frame in progress (0 until its header is in)."""
        return self._need - HEADER_SIZE if self._buffer else 0

    @property
    def partial_received(self) -> int:
        """How much of the body of the frame in progress is buffered (0 until its header
        is in)."""
        return len(self._buffer) - HEADER_SIZE if self._need > HEADER_SIZE and self._buffer else 0

    def feed(self, data: bytes) -> list[bytes]:
        """Add `data`; return every frame body it completes, in order.

        Raises `InvalidFrame` for a zero length and `FrameTooLarge` for a length
        above the limit; the decoder is unusable afterwards.
        """
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < self._need:
                return []
            data = bytes(buffer)
        elif len(data) > HEADER_SIZE:
            # The usual chunk: exactly one whole frame.
            (length,) = _unpack_header(data)
            if len(data) == HEADER_SIZE + length and length <= self.max_frame_bytes:
                return [data[HEADER_SIZE:]]
        frames: list[bytes] = []
        size = len(data)
        pos = 0
        limit = self.max_frame_bytes
        while size - pos >= HEADER_SIZE:
            (length,) = _unpack_header(data, pos)
            if length == 0:
                raise InvalidFrame("frame length is 0; frames carry 1 or more bytes")
            if length > limit:
                raise FrameTooLarge(f"frame length {length} exceeds the limit of {limit} bytes")
            end = pos + HEADER_SIZE + length
            if end > size:
                self._need = end - pos
                break
            frames.append(data[pos + HEADER_SIZE : end])
            pos = end
        else:
            self._need = HEADER_SIZE
        self._buffer = bytearray(data[pos:]) if pos < size else bytearray()
        return frames

    def check_eof(self) -> None:
        """Raise `InvalidFrame` when the stream ended in the middle of a frame."""
        if self._buffer:
            raise InvalidFrame(
                f"connection closed in the middle of a frame ({len(self._buffer)} bytes buffered)"
            )
