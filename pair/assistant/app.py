"""The assistant daemon's composition root: flags, database, routes, background upkeep."""

from __future__ import annotations

import argparse
import functools
import logging

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from pair.assistant.db import Database, high_water
from pair.assistant.loop_reader import BUDGET, MAX_BUDGET
from pair.assistant.proxy import sweep_idempotency_keys
from pair.assistant.routes import AssistantRoutes
from pair.runtime import daemon
from pair.runtime.backup import Snapshotter
from pair.runtime.daemon import DaemonConfig
from pair.runtime.errors import EX_CONFIG, StartupError
from pair.runtime.sqlite import now_ms
from pair.runtime.upkeep import run_periodically

IDEMPOTENCY_KEEP_MS = 48 * 3600 * 1000
SWEEP_INTERVAL = 3600.0

log = logging.getLogger("assistant")


class AssistantApp:
    """assistant.db behind assistant.sock."""

    def __init__(self, config: DaemonConfig, args: argparse.Namespace) -> None:
        self.db = Database(
            args.db or str(config.state_dir / "assistant.db"),
            config.busy_timeout_ms,
            config.synchronous,
            config.limits.max_frame_bytes,
            loop_reads=args.loop_reads,
            loop_budget=_loop_budget(args.loop_budget_us),
        )
        self.snapshots = Snapshotter(
            "assistant", self.db.path, high_water, busy_timeout_ms=config.busy_timeout_ms
        )
        self.routes = AssistantRoutes(self.db, self.snapshots)
        self.router = self.routes.router

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self.db.open)
        log.info("database %s open at schema version %d", self.db.path, self.db.schema_version)

    async def run_background(self, task_group: TaskGroup) -> None:
        task_group.start_soon(
            run_periodically,
            "the idempotency key sweep",
            self._sweep_idempotency_keys,
            SWEEP_INTERVAL,
            log,
        )

    async def _sweep_idempotency_keys(self) -> None:
        # Keys live at least 24 h (SPEC); sweeping at 48 h keeps that with margin.
        job = functools.partial(
            sweep_idempotency_keys, older_than_ms=now_ms() - IDEMPOTENCY_KEEP_MS
        )
        removed = await self.db.write(job)
        if removed:
            log.info("forgot %d idempotency key(s) older than 48 h", removed)

    async def close(self, timeout: float) -> None:
        self.db.stop_loop_reads()
        await anyio.to_thread.run_sync(self.db.close, timeout)

    def status(self) -> str:
        return f"serving {self.db.path} (schema {self.db.schema_version})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", help="path of assistant.db (default: STATE_DIR/assistant.db)")
    parser.add_argument(
        "--loop-reads",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="try each query on the event loop's own connection first, under a 100 us"
        " budget (default: on; README, Performance). --no-loop-reads: every query on the"
        " reader threads, as in 0.1.0",
    )
    parser.add_argument(
        "--loop-budget-us",
        type=int,
        default=round(BUDGET * 1e6),
        help="how long a query may run on the event loop before it is stopped and run by"
        " the reader threads (default: 100, about one hand-over to a thread)",
    )


def _loop_budget(micros: int) -> float:
    if not 1 <= micros <= MAX_BUDGET * 1e6:
        raise StartupError(
            f"--loop-budget-us must be from 1 to {MAX_BUDGET * 1e6:.0f}, got {micros}", EX_CONFIG
        )
    return micros / 1e6


def main(argv: list[str] | None = None) -> int:
    return daemon.main(
        "assistant",
        "Owns assistant.db and serves it on assistant.sock (JSON-RPC 2.0).",
        AssistantApp,
        add_arguments,
        argv,
    )
