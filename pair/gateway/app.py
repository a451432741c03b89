"""The gateway daemon's composition root: flags, database, key, link, background tasks."""

from __future__ import annotations

import argparse
import functools
import logging

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from pair.gateway import invites
from pair.gateway.codes import CodeHasher, keyed_invite_count, load_or_create_key
from pair.gateway.db import Database, high_water
from pair.gateway.delivery import Delivery
from pair.gateway.invites import GuessLimits
from pair.gateway.link import AssistantLink
from pair.gateway.one_time_migrations import MigrationRunner
from pair.gateway.outbox import backlog_bounds, dead_count
from pair.gateway.routes import GatewayRoutes
from pair.runtime import daemon
from pair.runtime.backup import Snapshotter
from pair.runtime.daemon import DaemonConfig
from pair.runtime.upkeep import run_periodically

SWEEP_INTERVAL = 60.0

log = logging.getLogger("gateway")


class GatewayApp:
    """gateway.db behind gateway.sock, and the link to the assistant."""

    def __init__(self, config: DaemonConfig, args: argparse.Namespace) -> None:
        self.db = Database(
            args.db or str(config.state_dir / "gateway.db"),
            config.synchronous,
            config.busy_timeout_ms,
        )
        self.key_path = args.key_file or str(config.state_dir / "gateway.key")
        self.hasher: CodeHasher | None = None
        self.limits = GuessLimits(
            per_sender=args.guess_limit_sender,
            per_channel=args.guess_limit_channel,
            window_ms=int(args.guess_window * 1000),
        )
        assistant_socket = args.assistant_socket or str(config.runtime_dir / "assistant.sock")
        self.link = AssistantLink(assistant_socket)
        self.delivery = Delivery(self.db, self.link)
        self.migrations = MigrationRunner(self.db, self.link)
        # The key goes with the database: without it no invite code of the snapshot
        # can be redeemed.
        self.snapshots = Snapshotter(
            "gateway",
            self.db.path,
            high_water,
            extra=[(self.key_path, "gateway.key")],
            busy_timeout_ms=config.busy_timeout_ms,
        )
        self.routes = GatewayRoutes(
            self.db,
            self._code_hasher,
            self.limits,
            self.link,
            self.delivery,
            self.migrations,
            self.snapshots,
        )
        self.router = self.routes.router

    def _code_hasher(self) -> CodeHasher:
        assert self.hasher is not None, "the key is loaded at start-up"
        return self.hasher

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self.db.open)
        keyed = await self.db.run(keyed_invite_count)
        key = await anyio.to_thread.run_sync(load_or_create_key, self.key_path, lambda: keyed)
        self.hasher = CodeHasher(key)
        await self.migrations.load()
        done_through, queued_through, oldest_at = await self.db.run(backlog_bounds)
        self.delivery.backlog.done(done_through)
        self.delivery.backlog.queued(queued_through)
        self.delivery.backlog.oldest_at = oldest_at
        self.delivery.dead = await self.db.run(dead_count)
        log.info("database %s open at schema version %d", self.db.path, self.db.schema_version)

    async def run_background(self, task_group: TaskGroup) -> None:
        task_group.start_soon(self._link_then_migrate)
        task_group.start_soon(self.delivery.run_forever)
        task_group.start_soon(
            run_periodically, "the invite sweep", self._sweep, SWEEP_INTERVAL, log
        )

    async def _link_then_migrate(self) -> None:
        log.info("waiting for the assistant at %s", self.link.socket_path)
        await self.link.wait_until_up()
        await self.migrations.run()

    async def _sweep(self) -> None:
        expired, forgotten = await self.db.run(functools.partial(invites.sweep, limits=self.limits))
        if expired or forgotten:
            log.info("expired %d invite(s), forgot %d old failed attempt(s)", expired, forgotten)

    async def close(self, timeout: float) -> None:
        await self.link.aclose()
        await anyio.to_thread.run_sync(self.db.close, timeout)

    def status(self) -> str:
        return f"serving {self.db.path}; assistant link {self.link.status.state}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--db", help="path of gateway.db (default: STATE_DIR/gateway.db)")
    add("--key-file", help="path of gateway.key (default: STATE_DIR/gateway.key)")
    add("--assistant-socket", help="the assistant's socket (default: RUNTIME_DIR/assistant.sock)")
    defaults = GuessLimits()
    add("--guess-limit-sender", type=int, default=defaults.per_sender,
        help="failed redemptions allowed per sender per window")  # fmt: skip
    add("--guess-limit-channel", type=int, default=defaults.per_channel,
        help="failed redemptions allowed per channel per window")  # fmt: skip
    add("--guess-window", type=float, default=defaults.window_ms / 1000,
        help="the sliding window of the guess limits, in seconds")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return daemon.main(
        "gateway",
        "Owns gateway.db (contacts, invites) and serves gateway.sock (JSON-RPC 2.0).",
        GatewayApp,
        add_arguments,
        argv,
    )
