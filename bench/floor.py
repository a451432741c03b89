"""The floor: a bare asyncio + msgspec length-prefixed echo over a Unix socket, with uvloop.

`python -m bench.floor PATH` serves PATH until killed. The client side is
`FloorClient`: one connection, a reader task, a future per call.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import sys
from typing import Any

import msgspec
import uvloop

_header = struct.Struct(">I")
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (length,) = _header.unpack(await reader.readexactly(4))
            message = _decoder.decode(await reader.readexactly(length))
            body = _encoder.encode(
                {"jsonrpc": "2.0", "id": message["id"], "result": message.get("params")}
            )
            writer.write(_header.pack(len(body)) + body)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def serve(path: str) -> None:
    server = await asyncio.start_unix_server(_serve_connection, path)
    async with server:
        await server.serve_forever()


class FloorClient:
    def __init__(self, path: str) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(self.path)
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        reader = self._reader
        while True:
            (length,) = _header.unpack(await reader.readexactly(4))
            message = _decoder.decode(await reader.readexactly(length))
            self._pending.pop(message["id"]).set_result(message["result"])

    async def call(self, method: str, params: Any = None) -> Any:
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        body = _encoder.encode(
            {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        )
        self._writer.write(_header.pack(len(body)) + body)
        return await future

    async def aclose(self) -> None:
        self._task.cancel()
        self._writer.close()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1]))
