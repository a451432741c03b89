"""A deliberately dumb blocking client that speaks raw frames, for hostile-input tests."""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

TIMEOUT = 10.0


class RawConnection:
    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, body: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def send_json(self, message: Any) -> None:
        self.send_frame(json.dumps(message).encode())

    def recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {size} bytes")
            data += chunk
        return data

    def recv_json(self) -> Any:
        (length,) = struct.unpack(">I", self.recv_exactly(4))
        return json.loads(self.recv_exactly(length))

    def call(self, message: Any) -> Any:
        self.send_json(message)
        return self.recv_json()

    def is_closed_by_peer(self) -> bool:
        """True when the peer closed (EOF or reset) within the timeout."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


NOBODY = 65534


def as_nobody(path: str, groups: list[int], message: object) -> tuple[Any, bool]:
    """Connect as uid `NOBODY` with supplementary `groups` and send `message`, or when it
    is None, nothing: the first answer, and then whether the daemon closed the connection."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with RawConnection(path) as conn:
                if message is not None:
                    conn.send_json(message)
                answer = conn.recv_json()
                closed = message is None and conn.is_closed_by_peer()
            os.write(write_end, json.dumps([answer, closed]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        _, status = os.waitpid(child, 0)
        answer, closed = json.loads(os.read(read_end, 65536))
    finally:
        os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    return answer, closed
