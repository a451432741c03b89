"""Fairness (issue 14): does one slow query, or a backup, hold back anybody else?

Three connections to one assistant. While the first runs a query that takes
`SLOW_SECONDS` (a recursive CTE stopped by its own `timeoutMs`), or takes
backups back to back (issue 23), a separate process calls `health` on the
second, one call a millisecond (its latencies, free of this process's own
scheduling), and this process keeps `IN_FLIGHT` point queries in flight on the
third. The same point-query load and probe run just before, with nothing
beside them: the point queries' rate is given as a ratio to that.

`python -m bench.fairness --probe SOCKET SECONDS` is the health prober.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvloop

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError

SLOW_SECONDS = 2.0
# The load and the probe start a little after the slow query and stop before it ends.
MARGIN = 0.2
IN_FLIGHT = 64
PROBE_EVERY = 0.001
SLOW_SQL = "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s) SELECT count(*) FROM s"


@dataclass
class Fairness:
    beside: str
    slow_seconds: float
    health_p50_ms_alone: float
    health_p99_ms_alone: float
    health_p50_ms: float
    health_p99_ms: float
    health_max_ms: float
    point_per_s_alone: float
    point_per_s: float
    slow_answer: str

    def lines(self) -> list[str]:
        return [
            f"fairness: one connection {self.beside} ({self.slow_answer}); meanwhile:",
            f"  health p99 on a 2nd connection   {self.health_p99_ms:6.2f} ms"
            f"  (p50 {self.health_p50_ms:.2f}, max {self.health_max_ms:.2f};"
            f" {self.health_p99_ms_alone:.2f} ms p99 and p50"
            f" {self.health_p50_ms_alone:.2f} without it)",
            f"  point queries/s on a 3rd         {self.point_per_s:9,.0f}"
            f"  ({self.point_per_s / self.point_per_s_alone:.2f}x the"
            f" {self.point_per_s_alone:,.0f}/s without it)",
        ]


async def run_fairness(
    socket_path: str,
    point_query: Callable[[Client], Awaitable[Any]],
    beside: Callable[[Client], Awaitable[str]] | None = None,
) -> Fairness:
    """The load and the probe alone, then beside the slow query (or `beside`, which runs
    `SLOW_SECONDS` and says what it did)."""
    window = SLOW_SECONDS - 2 * MARGIN
    async with Client(socket_path) as load:
        alone_rate, alone_probe = await _load_beside_probe(load, point_query, socket_path, window)
        async with Client(socket_path, timeout=60) as slow_client:
            slow = asyncio.ensure_future((beside or _slow_query)(slow_client))
            await asyncio.sleep(MARGIN)
            rate, probe = await _load_beside_probe(load, point_query, socket_path, window)
            slow_answer = await slow
    what = f"runs a {SLOW_SECONDS:.0f} s query" if beside is None else "takes backups back to back"
    return Fairness(
        beside=what,
        slow_seconds=SLOW_SECONDS,
        health_p50_ms_alone=_percentile(alone_probe, 0.5),
        health_p99_ms_alone=_percentile(alone_probe, 0.99),
        health_p50_ms=_percentile(probe, 0.5),
        health_p99_ms=_percentile(probe, 0.99),
        health_max_ms=max(probe),
        point_per_s_alone=alone_rate,
        point_per_s=rate,
        slow_answer=slow_answer,
    )


async def backups(client: Client) -> str:
    """`backup` back to back for `SLOW_SECONDS`, each snapshot removed once taken."""
    taken, size, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < SLOW_SECONDS:
        answer = await client.call("backup")
        for file in answer["files"]:
            size = file["bytes"]
            os.unlink(file["path"])
        taken += 1
    each = (time.perf_counter() - started) / taken * 1000
    return f"{taken} snapshots of {size / 1e6:.1f} MB, {each:.0f} ms each"


async def _slow_query(client: Client) -> str:
    started = time.perf_counter()
    params = {"sql": SLOW_SQL, "mode": "query", "timeoutMs": int(SLOW_SECONDS * 1000)}
    try:
        await client.call("db_proxy", params)
        outcome = "answered"
    except IpcHandlerError as exc:
        outcome = exc.code
    return f"{outcome} after {time.perf_counter() - started:.2f} s"


async def _load_beside_probe(
    load: Client,
    point_query: Callable[[Client], Awaitable[Any]],
    socket_path: str,
    seconds: float,
) -> tuple[float, list[float]]:
    """Point queries/s on `load` for `seconds`, and the health latencies (ms) of a prober
    process running meanwhile."""
    prober = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fairness",
        "--probe",
        socket_path,
        str(seconds),
        stdout=subprocess.PIPE,
    )
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await point_query(load)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    rate = done / (time.perf_counter() - started)
    out, _ = await prober.communicate()
    return rate, json.loads(out)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if fraction == 0.5:
        return round(statistics.median(ordered), 3)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * fraction))], 3)


async def _probe(socket_path: str, seconds: float) -> list[float]:
    """A `health` call every `PROBE_EVERY` seconds (paced, so the probe is not load itself)."""
    latencies = []
    async with Client(socket_path) as client:
        started = time.perf_counter()
        for index in range(int(seconds / PROBE_EVERY)):
            await asyncio.sleep(max(0.0, started + index * PROBE_EVERY - time.perf_counter()))
            begin = time.perf_counter()
            await client.call("health")
            latencies.append((time.perf_counter() - begin) * 1000)
    return latencies


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] != "--probe":
        sys.exit("usage: python -m bench.fairness --probe SOCKET SECONDS")
    print(json.dumps(uvloop.run(_probe(sys.argv[2], float(sys.argv[3])))))


if __name__ == "__main__":
    main()
