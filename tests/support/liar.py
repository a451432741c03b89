"""A lying daemon: a real asyncio server on a Unix socket, in a thread of its own, that
answers each call honestly or with the lie it is told.

The gateway meets it as it would meet a foreign or compromised assistant (and pairctl
as it would meet a foreign daemon): answers of the wrong types, control characters in
every string, a million capabilities, garbage bytes, silence. Honest, it answers as
this release's assistant does and keeps the events it is sent, once per id, in order.

A lie is `lie(method, params, id)`: an answer (a response object, or the raw body of a
frame), `None` for no answer at all, or `HONEST` for the honest answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

HEADER = struct.Struct(">I")
CAPABILITIES = ["emit_events", "emit_event", "health", "db_proxy", "pair.hello"]
HELLO = {
    "product": "pair",
    "daemon": "assistantd",
    "version": "0.2.0",
    "protocol": {"min": 1, "max": 1},
    "capabilities": CAPABILITIES,
}
STOP_TIMEOUT = 10.0

Answer = dict[str, Any] | bytes | None


class Honest:
    """What a lie returns for a call it answers honestly."""


HONEST = Honest()
Lie = Callable[[str, Any, Any], Answer | Honest | Awaitable[Answer]]
# An error object's `data` left out altogether.
NO_DATA = object()


def result(request_id: Any, value: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": value}


def error(request_id: Any, data: Any, message: str = "refused", code: int = -32000) -> Answer:
    shape: dict[str, Any] = {"code": code, "message": message}
    if data is not NO_DATA:
        shape["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": shape}


def on(method: str, answer: Callable[[Any], Answer | Awaitable[Answer]]) -> Lie:
    """A lie to `method` alone, `answer(id)`; every other call is answered honestly."""

    def lie(called: str, params: Any, request_id: Any) -> Answer | Honest | Awaitable[Answer]:
        return answer(request_id) if called == method else HONEST

    return lie


def refusal(code: str, status: int = 400, retryable: bool = False) -> dict[str, Any]:
    return {"statusCode": status, "errorCode": code, "retryable": retryable}


class Liar:
    """A daemon on `socket_path` until the `with` block ends; `tell(lie)` changes its
    answers, `stored` is what it was sent (honestly) by emit_events / emit_event."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.lie: Lie | None = None
        self.stored: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="liar")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    def __enter__(self) -> Liar:
        self._thread.start()
        self._server = self._run(asyncio.start_unix_server(self._serve, self.socket_path))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT)
        self._loop.close()

    def tell(self, lie: Lie | None) -> None:
        """Answer with `lie` from now on (None: honestly). The open connections are
        closed, so a client connects again and says hello to the new liar."""
        self.lie = lie
        self._run(self._drop())

    def stored_payloads(self, member: str) -> list[Any]:
        return [event["payload"][member] for event in list(self.stored)]

    def _run(self, coroutine: Awaitable[Any]) -> Any:
        async def run() -> Any:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(STOP_TIMEOUT)

    async def _drop(self) -> None:
        for writer in list(self._writers):
            writer.close()

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._drop()
        # A handler may still be in a lie's sleep: ended here, not left to a closed loop.
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            while True:
                (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                request = json.loads(await reader.readexactly(length))
                answer = await self._answer(request["method"], request.get("params"), request)
                if answer is not None:
                    body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                    writer.write(HEADER.pack(len(body)) + body)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            self._handlers.discard(handler)
            writer.close()

    async def _answer(self, method: str, params: Any, request: dict[str, Any]) -> Answer:
        request_id = request.get("id")
        answer = HONEST if self.lie is None else self.lie(method, params, request_id)
        if isinstance(answer, Honest):
            return self._honest(method, params, request_id)
        if isinstance(answer, dict | bytes | None):
            return answer
        return await answer

    def _honest(self, method: str, params: Any, request_id: Any) -> Answer:
        if method == "pair.hello":
            return result(request_id, HELLO)
        if method == "health":
            return result(request_id, {"status": "ok", "pid": os.getpid()})
        if method == "emit_events":
            stored = [self._store(event) for event in params["events"]]
            return result(request_id, {"accepted": sum(stored), "duplicates": []})
        if method == "emit_event":
            return result(request_id, {"stored": self._store(params)})
        if method == "db_proxy":
            return result(request_id, {"rows": [], "columns": []})
        return error(request_id, refusal("METHOD_NOT_FOUND", 404), "no such method", -32601)

    def _store(self, event: dict[str, Any]) -> bool:
        if any(kept["id"] == event["id"] for kept in self.stored):
            return False
        self.stored.append(event)
        return True
