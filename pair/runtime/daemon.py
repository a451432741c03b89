"""What both daemons share around their routes: flags, logging, the listener, the life cycle.

Life cycle: bind (or inherit) the socket -> open the app's resources (its
database) -> serve -> `READY=1`; on SIGTERM/SIGINT: `STOPPING=1` -> stop
accepting -> drain under the grace period -> close the resources -> exit 0,
all of it within `--grace` of the signal.
A fatal start-up problem is one line on stderr and a sysexits code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import json
import logging
import math
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from pair.protocol.dispatch import Router
from pair.protocol.framing import DEFAULT_FRAME_TIMEOUT, DEFAULT_MAX_FRAME_BYTES
from pair.protocol.host import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_MAX_PENDING_BYTES_TOTAL,
    ServerLimits,
)
from pair.protocol.server import Server
from pair.protocol.trace import record_span
from pair.runtime.errors import EX_CONFIG, StartupError
from pair.runtime.journal import JOURNAL_SOCKET, JournalHandler
from pair.runtime.listener import Listener, open_listener
from pair.runtime.memory import map_large_blocks
from pair.runtime.paths import default_runtime_dir, default_state_dir
from pair.runtime.restore import hold_for_daemon
from pair.runtime.sqlite import BUSY_TIMEOUT_MS, STOP_TIMEOUT
from pair.runtime.systemd import Notifier, run_watchdog, watchdog_interval

log = logging.getLogger("daemon")

# The end of --grace kept for closing the connections and the database (what still
# runs in SQLite then is interrupted or left behind): the exit never waits past it.
CLOSE_RESERVE = 0.5
STATUS_EVERY = 1.0


def close_reserve(grace: float) -> float:
    return min(CLOSE_RESERVE, grace / 4)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    name: str
    runtime_dir: Path
    state_dir: Path
    socket_path: str
    log_level: str
    log_format: str
    limits: ServerLimits
    allowed_uids: frozenset[int]
    allowed_gids: frozenset[int]
    socket_mode: int
    socket_group: str | None
    grace: float = 10.0
    synchronous: str = "full"
    busy_timeout_ms: int = BUSY_TIMEOUT_MS


class App(Protocol):
    """A daemon's own part: its routes and the resources they need."""

    router: Router

    async def open(self) -> None:
        """Open (and migrate) the database; raise `StartupError` when it cannot be."""

    async def run_background(self, task_group: TaskGroup) -> None:
        """Start the app's background tasks in `task_group` (cancelled at shutdown)."""

    async def close(self, timeout: float) -> None:
        """Release the resources after the drain, within `timeout` seconds."""

    def status(self) -> str:
        """One line for systemd's STATUS=."""


def argument_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{name}d", description=description)
    add = parser.add_argument
    add("--runtime-dir", type=Path, help="directory of the sockets (default: see README)")
    add("--state-dir", type=Path, help="directory of the databases (default: see README)")
    add("--socket", help=f"path of {name}.sock (default: RUNTIME_DIR/{name}.sock)")
    add("--log-level", default=os.environ.get("PAIR_LOG_LEVEL", "INFO"))
    add("--log-format", choices=("text", "json", "journal"),
        default=os.environ.get("PAIR_LOG_FORMAT", "text"),
        help="journal: journald's native protocol, with priorities and fields")  # fmt: skip
    add("--grace", type=float, default=10.0,
        help="seconds from SIGTERM to exit; in-flight calls get all but the last 0.5")  # fmt: skip
    add("--allow-uid", type=int, action="append", default=[], help="also accept this peer uid")
    add("--allow-group", action="append", default=[],
        help="also accept peers in this group (name or gid), e.g. the socket's")  # fmt: skip
    add("--socket-mode", type=lambda v: int(v, 8), default=0o600, help="octal, e.g. 660")
    add("--socket-group", help="group of the socket file (with --socket-mode 660)")
    _add_limits(add)
    _add_database(add)
    return parser


def _add_limits(add: Callable[..., object]) -> None:
    """What one peer, or all of them, may hold of the daemon."""
    add("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES)
    add("--frame-timeout", type=float, default=DEFAULT_FRAME_TIMEOUT)
    add("--max-in-flight", type=int, default=256)
    add(
        "--max-pending-bytes",
        type=int,
        default=DEFAULT_MAX_PENDING_BYTES,
        help="bytes of requests in flight on one connection past which it is not read from",
    )
    add(
        "--max-pending-bytes-total",
        type=int,
        default=DEFAULT_MAX_PENDING_BYTES_TOTAL,
        help="bytes of requests in flight on all connections past which none is read from",
    )
    add("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT,
        help="seconds a connection with no call may stay open (clients reconnect)")  # fmt: skip
    add("--max-connections", type=int, default=2048)


def _add_database(add: Callable[..., object]) -> None:
    add(
        "--synchronous",
        choices=("full", "normal"),
        default="full",
        help="full (default): an acknowledged write survives power loss; normal: faster, the"
        " last commits may be lost on power loss (never on a crash of the daemon; never what"
        " crossed to the other daemon)",
    )
    add(
        "--busy-timeout-ms",
        type=int,
        default=BUSY_TIMEOUT_MS,
        help="how long a write waits for a lock held by another process before DB_BUSY",
    )


def config_from_args(name: str, args: argparse.Namespace) -> DaemonConfig:
    runtime_dir = args.runtime_dir or default_runtime_dir()
    state_dir = args.state_dir or default_state_dir()
    if args.log_level.upper() not in logging.getLevelNamesMapping():
        raise StartupError(f"unknown --log-level {args.log_level!r}", EX_CONFIG)
    positive = {
        "--grace": args.grace,
        "--max-frame-bytes": args.max_frame_bytes,
        "--frame-timeout": args.frame_timeout,
        "--max-in-flight": args.max_in_flight,
        "--max-pending-bytes": args.max_pending_bytes,
        "--max-pending-bytes-total": args.max_pending_bytes_total,
        "--max-connections": args.max_connections,
        "--idle-timeout": args.idle_timeout,
    }
    for flag, value in positive.items():
        if value <= 0:
            raise StartupError(f"{flag} must be positive, got {value}", EX_CONFIG)
    limits = ServerLimits(
        max_frame_bytes=args.max_frame_bytes,
        frame_timeout=args.frame_timeout,
        max_in_flight=args.max_in_flight,
        max_pending_bytes=args.max_pending_bytes,
        max_pending_bytes_total=args.max_pending_bytes_total,
        max_connections=args.max_connections,
        grace=args.grace - close_reserve(args.grace),
        idle_timeout=args.idle_timeout,
    )
    return DaemonConfig(
        name=name,
        runtime_dir=runtime_dir,
        state_dir=state_dir,
        socket_path=args.socket or str(runtime_dir / f"{name}.sock"),
        log_level=args.log_level.upper(),
        log_format=args.log_format,
        limits=limits,
        allowed_uids=frozenset({os.getuid(), 0, *args.allow_uid}),
        allowed_gids=frozenset(map(_group_id, args.allow_group)),
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        grace=args.grace,
        synchronous=args.synchronous,
        busy_timeout_ms=args.busy_timeout_ms,
    )


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"--allow-group {group!r}: no such group", EX_CONFIG) from None


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        span = record_span(record)
        if span is not None:
            entry["trace_id"] = span.trace_id
            entry["span_id"] = span.span_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        try:
            # A fifth of json.dumps' cost: a redemption writes two lines.
            return _log_encoder.encode(entry).decode()
        except UnicodeEncodeError:  # a lone surrogate, which msgspec refuses
            return json.dumps(entry, ensure_ascii=False)


_log_encoder = msgspec.json.Encoder()


class _TextFormatter(logging.Formatter):
    """A line for a terminal; a traced one ends with its trace id."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        span = record_span(record)
        return line if span is None else f"{line} [trace {span.trace_id}]"


def setup_logging(name: str, level: str, log_format: str) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    # No line shows a thread's or a multiprocessing process's name: not looked up for
    # each record (a redemption writes two lines at info, its event's storing one more).
    logging.logThreads = False
    logging.logMultiprocessing = False
    journal_error: OSError | None = None
    if log_format == "journal":
        try:
            root.handlers[:] = [JournalHandler(f"{name}d", name)]
            return
        except OSError as exc:
            # Started by hand with the unit's flags: still a log, on stderr.
            journal_error, log_format = exc, "json"
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _TextFormatter(f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
        )
    root.handlers[:] = [handler]
    if journal_error is not None:
        log.warning("no journal at %s (%s): logging JSON to stderr", JOURNAL_SOCKET, journal_error)


def raise_fd_limit() -> None:
    """Let the connection cap, not the default soft fd limit, bound connections.

    Best effort: under systemd the unit's LimitNOFILE= sets it, and its
    SystemCallFilter may refuse setrlimit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except OSError as exc:
            log.info("keeping the fd limit at %d: %s", soft, exc)


async def serve_app(config: DaemonConfig, app: App, listener: Listener) -> None:
    """Serve `app` on `listener` until SIGTERM/SIGINT, then drain and close."""
    notifier = Notifier()
    started = time.monotonic()
    exit_by = math.inf
    # Installed first, so a signal during start-up is queued, not fatal.
    with _stop_signals() as signals:
        try:
            await app.open()
            server = Server(
                app.router,
                listener.sock,
                limits=config.limits,
                allowed_uids=config.allowed_uids,
                allowed_gids=config.allowed_gids,
                logger=logging.getLogger(f"{config.name}.server"),
            )

            def announce() -> None:
                log.info(
                    "%sd ready on %s (%s) in %.0f ms",
                    config.name,
                    listener.path,
                    "inherited from systemd" if listener.inherited else "bound",
                    (time.monotonic() - started) * 1000,
                )
                notifier.ready(app.status())

            async with anyio.create_task_group() as task_group:
                await task_group.start(_serve, server, announce, task_group.cancel_scope)
                task_group.start_soon(_keep_status, notifier, app.status)
                interval = watchdog_interval()
                if interval is not None:
                    task_group.start_soon(run_watchdog, notifier, interval)
                await app.run_background(task_group)
                async for signum in signals:
                    exit_by = time.monotonic() + config.grace
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    notifier.stopping()
                    server.shutdown()
                    break
                task_group.start_soon(_ignore_signals, signals)
        finally:
            with anyio.CancelScope(shield=True):
                left = exit_by - time.monotonic()
                await app.close(STOP_TIMEOUT if left == math.inf else max(0.0, left))
                listener.close()
                notifier.close()
    log.info("%sd stopped", config.name)


@contextlib.contextmanager
def _stop_signals() -> Iterator[MemoryObjectReceiveStream[int]]:
    """SIGTERM and SIGINT, as the loop receives them; ignored once this is left.

    Not the loop's own signal handlers (anyio's `open_signal_receiver`): removing
    them restores the default action first, and a second SIGTERM landing in that
    moment killed a daemon finishing its drain (exit -15: one run in fifteen of
    `test_sigterm_lets_in_flight_calls_finish_and_refuses_new_ones`). Here the
    handler goes straight to SIG_IGN.
    """
    loop = asyncio.get_running_loop()
    send, receive = anyio.create_memory_object_stream[int](math.inf)

    def deliver(signum: int) -> None:
        with contextlib.suppress(anyio.ClosedResourceError):
            send.send_nowait(signum)

    def on_signal(signum: int, _frame: object) -> None:
        # Python runs this in the main thread between two bytecodes, perhaps inside the
        # loop's own code: the stream is fed from a loop callback instead.
        loop.call_soon_threadsafe(deliver, signum)

    stop = (signal.SIGTERM, signal.SIGINT)
    for signum in stop:
        signal.signal(signum, on_signal)
    try:
        yield receive
    finally:
        for signum in stop:
            signal.signal(signum, signal.SIG_IGN)
        send.close()
        receive.close()


async def _keep_status(notifier: Notifier, status: Callable[[], str]) -> None:
    """Send STATUS= again whenever the app's line changes (the gateway's link state),
    so `systemctl status` never shows a stale one."""
    sent = status()
    while True:
        await anyio.sleep(STATUS_EVERY)
        line = status()
        if line != sent:
            notifier.notify(f"STATUS={line}")
            sent = line


async def _ignore_signals(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log.info("received %s: already stopping", signal.Signals(signum).name)


async def _serve(
    server: Server,
    on_ready: Callable[[], None],
    scope: anyio.CancelScope,
    *,
    task_status: TaskStatus[None],
) -> None:
    # Once the drain is over, the app's background tasks go too.
    await server.serve(on_ready=on_ready, task_status=task_status)
    scope.cancel()


AppFactory = Callable[[DaemonConfig, argparse.Namespace], App]


def main(
    name: str,
    description: str,
    make_app: AppFactory,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Parse flags, start the daemon and block until it stops; the process exit code."""
    parser = argument_parser(name, description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    # Databases, WAL files and the key are the daemon's alone.
    os.umask(0o077)
    try:
        config, state_lock, listener = _prepare(name, args)
    except StartupError as exc:
        print(f"{name}d: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        anyio.run(
            serve_app,
            config,
            make_app(config, args),
            listener,
            backend="asyncio",
            backend_options={"use_uvloop": sys.platform == "linux"},
        )
    except StartupError as exc:
        listener.close()
        print(f"{name}d: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        state_lock.close()
    return 0


def _prepare(name: str, args: argparse.Namespace) -> tuple[DaemonConfig, BinaryIO, Listener]:
    """Configuration, logging and limits; the state directory's lock, held open until
    the process ends (no restore begins while a daemon runs); the listener."""
    config = config_from_args(name, args)
    setup_logging(name, config.log_level, config.log_format)
    raise_fd_limit()
    map_large_blocks()
    state_lock = hold_for_daemon(config.state_dir, name)
    listener = open_listener(
        config.socket_path,
        daemon_name=f"{name}d",
        mode=config.socket_mode,
        group=config.socket_group,
        fd_name=f"{name}.sock",
    )
    return config, state_lock, listener
