"""`make bench-rss`: each daemon's RSS at idle and over a 60 s mixed load.

Starts the assistant and the gateway (release settings, logging at INFO),
reads their idle RSS, then keeps 64 calls in flight on each for
`--seconds`: point queries, inserts and 5-step transactions on the
assistant, redemptions of fresh invites on the gateway (whose events the
gateway delivers to the assistant meanwhile). RSS is sampled every 5 s; the
report gives idle, after the first 10 s (caches warm) and at the end, and
the growth between the last two. Like `make bench`, it never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import uvloop

from bench.__main__ import IN_FLIGHT, ROWS, Daemon, prepare_assistant, redeem_case
from pair.protocol.client import Client

SAMPLE_EVERY = 5.0
WARM_AFTER = 10.0


def rss_mib(daemon: Daemon) -> float:
    return round(daemon.rss()["VmRSS"] / 1024, 1)


async def keep_busy(calls: list[Any], until: float) -> int:
    """Cycle through `calls` with IN_FLIGHT in flight until `until`; how many were made."""
    done = 0

    async def worker(offset: int) -> None:
        nonlocal done
        index = offset
        while time.perf_counter() < until:
            await calls[index % len(calls)]()
            index += 1
            done += 1

    await asyncio.gather(*(worker(i) for i in range(IN_FLIGHT)))
    return done


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    common = ["--runtime-dir", str(workdir), "--state-dir", str(workdir)]
    assistant = Daemon("assistant", ["-m", "pair.assistant", *common], workdir)
    gateway = Daemon(
        "gateway", ["-m", "pair.gateway", *common, "--guess-limit-channel", "1000000000"], workdir
    )
    daemons = [assistant, gateway]
    for daemon in daemons:
        daemon.wait_ready()
    await asyncio.sleep(1.0)
    idle = {daemon.name: rss_mib(daemon) for daemon in daemons}
    print(f"idle RSS: {idle}", flush=True)
    samples: list[dict[str, Any]] = []
    async with (
        Client(str(workdir / "assistant.sock")) as to_assistant,
        Client(str(workdir / "gateway.sock")) as to_gateway,
    ):
        await prepare_assistant(to_assistant)
        counter = iter(range(1, 1 << 62))
        steps = [{"sql": "INSERT INTO log (v) VALUES (?)", "bind": [f"s{i}"]} for i in range(5)]

        def point() -> Awaitable[Any]:
            bind = [next(counter) % ROWS + 1]
            sql = "SELECT v FROM kv WHERE id = ?"
            return to_assistant.call("db_proxy", {"sql": sql, "mode": "query", "bind": bind})

        def insert() -> Awaitable[Any]:
            sql = "INSERT INTO log (v) VALUES (?)"
            return to_assistant.call("db_proxy", {"sql": sql, "mode": "run", "bind": ["x"]})

        def transaction() -> Awaitable[Any]:
            return to_assistant.call("db_proxy_transaction", {"steps": steps})

        sizing = argparse.Namespace(warmup=0, repeat=1, calls=0, seconds=args.seconds / 4)
        redeem = await redeem_case(to_gateway, sizing)
        started = time.perf_counter()
        until = started + args.seconds
        load = asyncio.gather(
            keep_busy([point, point, insert, transaction], until), keep_busy([redeem], until)
        )
        while not load.done():
            await asyncio.wait([load], timeout=SAMPLE_EVERY)
            sample = {"at_s": round(time.perf_counter() - started, 1)}
            sample.update({daemon.name: rss_mib(daemon) for daemon in daemons})
            samples.append(sample)
            print(f"  {sample}", flush=True)
        assistant_calls, gateway_calls = load.result()
    for daemon in daemons:
        daemon.stop()
    warm = next(s for s in samples if s["at_s"] >= WARM_AFTER)
    last = samples[-1]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": args.seconds,
        "calls": {"assistant": assistant_calls, "gateway": gateway_calls},
        "idle_mib": idle,
        "warm_mib": {d.name: warm[d.name] for d in daemons},
        "end_mib": {d.name: last[d.name] for d in daemons},
        "growth_after_warm_mib": {d.name: round(last[d.name] - warm[d.name], 1) for d in daemons},
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rss")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rss-", dir="/tmp") as tmp:
        report = uvloop.run(run(args, Path(tmp)))
    print(
        f"\nidle {report['idle_mib']} MiB; after {WARM_AFTER:g} s {report['warm_mib']} MiB;"
        f" at the end {report['end_mib']} MiB; growth {report['growth_after_warm_mib']} MiB;"
        f" calls {report['calls']}"
    )
    out = args.out or Path("bench/results") / f"{datetime.date.today().isoformat()}-rss.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
