"""The second floor: a bare server answering `db_proxy` point queries on its loop thread.

`python -m bench.bare SOCKET DATABASE` serves SOCKET until killed: a uvloop
`asyncio.Protocol`, the pair's framing (a 4-byte big-endian length, then JSON),
msgspec, and one read-only apsw connection running each query on the loop
thread. No policy, deadline, size accounting, metrics or trace: what Python, the
wire and SQLite cost for a point query, measured with the same client as the
assistant's case, so that the difference is what the assistant does around the
statement.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any, cast

import apsw
import msgspec
import uvloop

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


class BareProtocol(asyncio.Protocol):
    def __init__(self, db: apsw.Connection) -> None:
        self._db = db
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        answers = []
        while len(buffer) >= 4:
            length = int.from_bytes(buffer[:4], "big")
            if len(buffer) < 4 + length:
                break
            request: dict[str, Any] = _decoder.decode(bytes(buffer[4 : 4 + length]))
            del buffer[: 4 + length]
            params = request["params"]
            cursor = self._db.execute(params["sql"], params.get("bind"))
            columns = [column[0] for column in cursor.description]
            rows = [dict(zip(columns, row, strict=True)) for row in cursor]
            body = _encoder.encode(
                {
                    "jsonrpc": "2.0",
                    "id": request["id"],
                    "result": {"columns": columns, "rows": rows, "truncated": False},
                }
            )
            answers.append(len(body).to_bytes(4, "big") + body)
        if answers and self._transport is not None:
            self._transport.write(b"".join(answers))


async def serve(path: str, database: str) -> None:
    db = apsw.Connection(database, flags=apsw.SQLITE_OPEN_READONLY)
    server = await asyncio.get_running_loop().create_unix_server(lambda: BareProtocol(db), path)
    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", notify)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1], sys.argv[2]))
