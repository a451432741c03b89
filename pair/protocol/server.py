"""The JSON-RPC server: the listener, admission, the count of calls in flight, and the drain.

Why `asyncio.Protocol` (`protocol.connection`) under anyio: the per-frame
path is the product here. A protocol object gets whole chunks from the loop,
splits every complete frame out of each, answers inline methods without
creating a task and coalesces the answers of one loop turn into one write.
anyio gives the structure around it (`serve()` reports ready through
`TaskStatus` only once the listener accepts; the daemon's task group owns
`serve()`). The price is that this module runs on anyio's asyncio backend
only (with uvloop on Linux), which is what the daemons use. How each call
runs is `protocol.calls`.

The shutdown, in order (the daemon's side is `runtime.daemon.serve_app`):
1. at the signal, `Server.shutdown()`: stop accepting (callers wait in the backlog
   for the next process) and refuse every new call (SHUTTING_DOWN);
2. `Server._drain`: the calls in flight finish, within the grace; a connection
   accepted but not yet heard from sends its first request (and is refused);
3. the end of `Server.serve`: what still runs is cancelled, every connection closed
   after its queued answers;
4. `serve_app`: the app's background tasks are cancelled, its databases closed in
   what is left of the grace, then the listener and the notifier.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from pair.protocol.calls import Calls
from pair.protocol.connection import Connection
from pair.protocol.dispatch import Router
from pair.protocol.errors import Forbidden, RpcError, TooManyConnections
from pair.protocol.host import ServerLimits

__all__ = ["Server", "ServerLimits"]

# Answers already queued get this long to be written after the drain (the daemon's
# exit keeps 0.5 s of --grace for this and closing the database).
_CLOSE_WAIT = 0.2
# How long, at most, a connection accepted just before the shutdown gets to send its
# first request (answered SHUTTING_DOWN, retryable) before it is closed: its caller
# connected before the listener closed and writes at once, and a close before that
# write is read would reach it as a reset.
_FIRST_REQUEST_WAIT = 0.5
STARVED_LOG_EVERY = 10.0  # seconds: under sustained pressure, one line, not one per call
IDLE_CHECK_MAX = 30.0
_UCRED = struct.Struct("3i")
# Linux's SO_PEERGROUPS (4.13+; not in the socket module): the peer's groups when it
# connected, mapped into our user namespace, so it works under PrivateUsers=yes,
# where a peer's uid other than root or ours reads as the overflow uid.
_SO_PEERGROUPS = 59
# Python's getsockopt() reads at most 1024 bytes: 256 groups. A peer in more is
# judged by its uid and primary group alone.
_PEERGROUPS_BYTES = 1024


class Server:
    """Serves a `Router` on a listening Unix socket until `shutdown()` and the drain finish."""

    def __init__(
        self,
        router: Router,
        listener: socket.socket,
        *,
        limits: ServerLimits | None = None,
        allowed_uids: frozenset[int] | None = None,
        allowed_gids: frozenset[int] = frozenset(),
        logger: logging.Logger | None = None,
    ) -> None:
        self.router = router
        self.limits = limits or ServerLimits()
        self.allowed_uids = allowed_uids
        self.allowed_gids = allowed_gids
        # Who may call the `admin` methods: the daemon's own uid and root, never a uid or
        # group the flags let connect.
        self.admin_uids = frozenset({os.getuid(), 0})
        self.log = logger or logging.getLogger("protocol.server")
        self.calls = Calls(router, self.log)
        self.in_flight = 0
        self.pending_bytes = 0
        self.connections: set[Connection] = set()
        # Connections not read from because `pending_bytes` is over its budget.
        self._starved: set[Connection] = set()
        self._starved_logged_at = -STARVED_LOG_EVERY
        self._listener = listener
        self._listening: asyncio.Server | None = None
        self._stop = anyio.Event()
        self._idle: anyio.Event | None = None
        self._all_closed: anyio.Event | None = None
        self._heard: anyio.Event | None = None

    def shutdown(self) -> None:
        """Begin the drain: stop accepting, refuse new calls, let in-flight ones finish."""
        # Refuse from now on, not from when serve() next runs: a call read in
        # between would start after STOPPING=1 was announced.
        self.calls.draining = True
        # Stop accepting now, not when serve() next runs: a caller accepted in
        # between would only be refused, while under socket activation it can wait
        # in the backlog for the next process.
        if self._listening is not None:
            self._listening.close()
        self._stop.set()

    async def serve(
        self,
        *,
        on_ready: Callable[[], None] | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve until `shutdown()` and the drain are over.

        `on_ready` runs once the listener is set up and before the first
        connection is taken from it (callers wait in the backlog meanwhile),
        so a READY=1 sent there precedes every answer. The shutdown's order is in the
        module's docstring.
        """
        loop = asyncio.get_running_loop()
        try:
            listening = self._listening = await loop.create_unix_server(
                lambda: Connection(self),
                sock=self._listener,
                backlog=self.limits.backlog,
                start_serving=False,
            )
            if on_ready is not None:
                on_ready()
            await listening.start_serving()
            task_status.started()
            async with anyio.create_task_group() as idle:
                idle.start_soon(self._close_idle_connections)
                await self._stop.wait()
                idle.cancel_scope.cancel()
            await self._drain(listening)
        finally:
            # Also when serve() itself is cancelled: no new call may start now.
            self.calls.draining = True
            with anyio.CancelScope(shield=True):
                await self.calls.cancel_tasks()
                await self._close_connections()

    def _allowed(self, sock: socket.socket, uid: int, gid: int) -> bool:
        if self.allowed_uids is None or uid in self.allowed_uids:
            return True
        if not self.allowed_gids:
            return False
        return gid in self.allowed_gids or not self.allowed_gids.isdisjoint(peer_groups(sock))

    def _who_may(self) -> str:
        uids = ", ".join(map(str, sorted(self.allowed_uids or ())))
        if not self.allowed_gids:
            return f"allowed uids: {uids}"
        gids = ", ".join(map(str, sorted(self.allowed_gids)))
        return f"allowed uids: {uids}; members of gids: {gids}"

    async def _drain(self, listening: asyncio.Server) -> None:
        listening.close()
        self.log.info(
            "draining: %d call(s) in flight, grace %.1fs", self.in_flight, self.limits.grace
        )
        deadline = anyio.current_time() + self.limits.grace
        with anyio.CancelScope(deadline=deadline):
            if self.in_flight:
                self._idle = anyio.Event()
                await self._idle.wait()
        with anyio.CancelScope(deadline=min(deadline, anyio.current_time() + _FIRST_REQUEST_WAIT)):
            await self._hear_new_connections()
        if self.in_flight:
            # Coroutine calls are cancelled; a database job already queued still
            # runs (its thread finishes the queue), its answer is dropped.
            self.log.warning(
                "grace period over: %d call(s) still running are abandoned", self.in_flight
            )

    async def _hear_new_connections(self) -> None:
        while any(not connection.heard for connection in self.connections):
            self._heard = anyio.Event()
            await self._heard.wait()

    def heard_from(self, connection: Connection) -> None:
        if self._heard is not None:
            self._heard.set()

    async def _close_idle_connections(self) -> None:
        """Close connections with no call for `idle_timeout`: an idle peer holds no slot
        of `max_connections` for ever. Checked a few times per timeout, not per chunk."""
        timeout = self.limits.idle_timeout
        while True:
            await anyio.sleep(min(timeout / 4, IDLE_CHECK_MAX))
            idle_since = asyncio.get_running_loop().time() - timeout
            for connection in list(self.connections):
                connection.close_if_idle(idle_since)

    async def _close_connections(self) -> None:
        if not self.connections:
            return
        self._all_closed = anyio.Event()
        for connection in list(self.connections):
            connection.close()
        with anyio.move_on_after(_CLOSE_WAIT):
            await self._all_closed.wait()

    def call_started(self, size: int) -> None:
        self.in_flight += 1
        self.pending_bytes += size

    def call_finished(self, size: int) -> None:
        self.in_flight -= 1
        self.hold(-size)
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def hold(self, size: int) -> None:
        self.pending_bytes += size
        budget = self.limits.max_pending_bytes_total
        if size < 0 and self._starved and self.pending_bytes < budget:
            starved, self._starved = self._starved, set()
            for connection in starved:
                connection.update_reading()

    def may_read(self, connection: Connection) -> bool:
        if self.pending_bytes < self.limits.max_pending_bytes_total:
            return True
        now = time.monotonic()
        if not self._starved and now - self._starved_logged_at >= STARVED_LOG_EVERY:
            self._starved_logged_at = now
            self.log.info(
                "calls in flight hold %d bytes of requests (budget %d): reading paused",
                self.pending_bytes,
                self.limits.max_pending_bytes_total,
            )
        self._starved.add(connection)
        return False

    def connection_lost(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self.router.server_counts.open = len(self.connections)
        self._starved.discard(connection)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def admit(self, connection: Connection, transport: asyncio.Transport) -> RpcError | None:
        """Admission: the peer's uid or one of its groups must be allowed, and the
        connection cap not reached."""
        self.connections.add(connection)
        sock = transport.get_extra_info("socket")
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        connection.peer = f"pid={pid} uid={uid}"
        connection.admin = uid in self.admin_uids
        counts = self.router.server_counts
        counts.open = len(self.connections)
        if not self._allowed(sock, uid, gid):
            counts.refused["forbidden"] += 1
            return Forbidden(f"uid {uid} may not use this socket ({self._who_may()})")
        if len(self.connections) > self.limits.max_connections:
            counts.refused["limit"] += 1
            return TooManyConnections(
                f"too many connections (limit {self.limits.max_connections}); retry later"
            )
        return None


def peer_groups(sock: socket.socket) -> frozenset[int]:
    """The supplementary groups of a Unix socket's peer; empty where the kernel cannot say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _PEERGROUPS_BYTES)
    except OSError:
        return frozenset()
    return frozenset(array.array("I", raw))
