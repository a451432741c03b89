"""`make bench`: real daemons, the real client, and the bare floor, in one run.

Each case runs sequentially (one call at a time: p50/p99 latency) and with 64
calls in flight on one connection (calls/s, and the server's CPU per call),
after a warm-up, several times; medians are reported. Each run of a case is
paired with a run of the floor just before it, and the case's ratios (calls/s,
p50, server CPU per call) are the medians of the pairs' ratios. Results go to
bench/results/<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from bench.fairness import Fairness, backups, run_fairness
from bench.floor import FloorClient
from bench.sustained import QUEUED, Sustained, delivery_alone, queue_events, run_sustained
from pair.protocol.client import BatchCall, Client

Call = Callable[[], Awaitable[Any]]
IN_FLIGHT = 64


@dataclass
class CaseResult:
    name: str
    target: str
    seq_calls_per_s: float
    seq_p50_us: float
    seq_p99_us: float
    par_calls_per_s: float
    server_cpu_us_per_call: float | None
    ratio_seq_p50: float | None = None
    ratio_par: float | None = None
    floor_seq_p50_us: float | None = None
    floor_par_calls_per_s: float | None = None
    floor_cpu_us_per_call: float | None = None
    ratio_cpu: float | None = None
    note: str = ""


@dataclass
class Report:
    date: str
    machine: str
    python: str
    cases: list[CaseResult] = field(default_factory=list)
    rss_kib: dict[str, dict[str, int]] = field(default_factory=dict)
    sustained: Sustained | None = None
    fairness: Fairness | None = None
    backup: Fairness | None = None


class Daemon:
    """A daemon subprocess whose readiness is its READY=1 on a private NOTIFY_SOCKET."""

    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        notify_path = str(workdir / f".{name}.notify")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(notify_path)
        self._notify.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": notify_path, "PAIR_LOG_LEVEL": "INFO"}
        log = (workdir / f"{name}.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, *args], env=env, stderr=log)

    def wait_ready(self) -> None:
        while b"READY=1" not in self._notify.recv(4096):
            pass

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def rss(self) -> dict[str, int]:
        values = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
        return values

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self._notify.close()


async def sequential(call: Call, count: int) -> tuple[float, float, float]:
    latencies = []
    started = time.perf_counter()
    for _ in range(count):
        begin = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - begin)
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return count / elapsed, statistics.median(latencies) * 1e6, p99 * 1e6


async def concurrent(call: Call, seconds: float) -> tuple[float, int]:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return done / (time.perf_counter() - started), done


@dataclass
class Floor:
    """The bare floor, measured beside each case: `call` on it and its server process."""

    call: Call
    daemon: Daemon


async def measure(
    name: str,
    target: str,
    call: Call,
    daemon: Daemon | None,
    args: argparse.Namespace,
    note: str = "",
    floor: Floor | None = None,
) -> CaseResult:
    """Median of `args.repeat` runs; with `floor`, each run is paired with a floor run just
    before it, and the ratios are the medians of the pairs' ratios.

    Pairing matters here: this VM's speed drifts by up to 1.5x within a run,
    so a floor measured once at the start would not be the floor of a case
    measured a minute later.
    """
    for _ in range(args.warmup):
        await call()
    seq_runs, par_runs, cpu_runs = [], [], []
    floor_seq, floor_par, floor_cpu = [], [], []
    for _ in range(args.repeat):
        if floor is not None:
            floor_seq.append(await sequential(floor.call, args.calls))
            rate, cpu = await concurrent_with_cpu(floor.call, args.seconds, floor.daemon)
            floor_par.append(rate)
            floor_cpu.append(cpu)
        seq_runs.append(await sequential(call, args.calls))
        rate, cpu = await concurrent_with_cpu(call, args.seconds, daemon)
        par_runs.append(rate)
        if cpu is not None:
            cpu_runs.append(cpu)
    result = CaseResult(
        name=name,
        target=target,
        seq_calls_per_s=round(statistics.median(run[0] for run in seq_runs)),
        seq_p50_us=round(statistics.median(run[1] for run in seq_runs), 1),
        seq_p99_us=round(statistics.median(run[2] for run in seq_runs), 1),
        par_calls_per_s=round(statistics.median(par_runs)),
        server_cpu_us_per_call=round(statistics.median(cpu_runs), 1) if cpu_runs else None,
        note=note,
    )
    if floor is not None:
        result.floor_seq_p50_us = round(statistics.median(run[1] for run in floor_seq), 1)
        result.floor_par_calls_per_s = round(statistics.median(floor_par))
        result.ratio_seq_p50 = _median_ratio([r[1] for r in seq_runs], [f[1] for f in floor_seq])
        result.ratio_par = _median_ratio(par_runs, floor_par)
        cpus = [c for c in floor_cpu if c is not None]
        if cpus and len(cpus) == len(cpu_runs):
            result.floor_cpu_us_per_call = round(statistics.median(cpus), 1)
            result.ratio_cpu = _median_ratio(cpu_runs, cpus)
    print(
        f"  {name:<34} seq p50 {result.seq_p50_us:7.1f} us"
        f"   64 in flight {result.par_calls_per_s:9,.0f}/s"
        + (f"  ({result.ratio_par:g}x its floor)" if result.ratio_par is not None else ""),
        flush=True,
    )
    return result


async def concurrent_with_cpu(
    call: Call, seconds: float, daemon: Daemon | None
) -> tuple[float, float | None]:
    """Calls/s with IN_FLIGHT in flight, and the server's CPU per call (us) when known."""
    cpu_before = daemon.cpu_seconds() if daemon else 0.0
    rate, done = await concurrent(call, seconds)
    if daemon is None:
        return rate, None
    return rate, (daemon.cpu_seconds() - cpu_before) / done * 1e6


def _median_ratio(values: list[float], floors: list[float]) -> float:
    return round(statistics.median(v / f for v, f in zip(values, floors, strict=True)), 2)


async def run(args: argparse.Namespace, workdir: Path) -> Report:
    report = Report(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=f"{platform.machine()} {os.cpu_count()} cores",
        python=platform.python_version(),
    )
    floor = Daemon("floor", ["-m", "bench.floor", str(workdir / "floor.sock")], workdir)
    demo = Daemon(
        "demo",
        [
            "-m",
            "tests.support.demo_server",
            "--runtime-dir",
            str(workdir),
            "--state-dir",
            str(workdir),
        ],
        workdir,
    )
    assistant = Daemon(
        "assistant",
        [
            "-m",
            "pair.assistant",
            "--runtime-dir",
            str(workdir),
            "--state-dir",
            str(workdir),
            *([] if args.loop_reads else ["--no-loop-reads"]),
        ],
        workdir,
    )
    gateway = Daemon(
        "gateway",
        ["-m", "pair.gateway", "--runtime-dir", str(workdir), "--state-dir", str(workdir),
         "--guess-limit-channel", "1000000000"],
        workdir,
    )  # fmt: skip
    (workdir / "normal").mkdir()
    normal = Daemon(
        "assistant-normal",
        ["-m", "pair.assistant", "--runtime-dir", str(workdir / "normal"),
         "--state-dir", str(workdir / "normal"), "--synchronous", "normal"],
        workdir,
    )  # fmt: skip
    daemons = [demo, assistant, gateway, normal]
    for daemon in daemons:
        daemon.wait_ready()
    await wait_for_socket(workdir / "floor.sock")
    floor_client = FloorClient(str(workdir / "floor.sock"))
    await floor_client.connect()
    small = {"value": 1}
    payload_4k = {"text": "x" * 4096}
    print("cases (median of runs; each run paired with a floor run):", flush=True)
    ping = Floor(lambda: floor_client.call("echo", small), floor)
    ping_4k = Floor(lambda: floor_client.call("echo", payload_4k), floor)
    report.cases.append(await measure("floor: echo", "floor", ping.call, floor, args))
    report.cases.append(await measure("floor: echo 4 KiB", "floor", ping_4k.call, floor, args))
    async with Client(str(workdir / "demo.sock")) as demo_client:
        demo_cases: list[tuple[str, Call]] = [
            ("protocol: echo (inline)", lambda: demo_client.call("echo", small)),
            ("protocol: echo (task)", lambda: demo_client.call("echo_async", small)),
        ]
        for name, call in demo_cases if not args.reads_only else []:
            report.cases.append(await measure(name, "demo", call, demo, args, floor=ping))
    async with Client(str(workdir / "assistant.sock")) as client:
        await prepare_assistant(client)
        report.cases.append(await measure_bare(workdir, args, ping))
        for name, call, paired, note in assistant_cases(client, ping, ping_4k):
            if args.reads_only and name not in READ_CASES:
                continue
            result = await measure(name, "assistant", call, assistant, args, note, paired)
            report.cases.append(result)
    print("fairness: point queries and health beside a 2 s query ...", flush=True)
    report.fairness = await run_fairness(str(workdir / "assistant.sock"), point_query)
    print("fairness: point queries and health beside backups ...", flush=True)
    report.backup = await run_fairness(str(workdir / "assistant.sock"), point_query, backups)
    if args.reads_only:
        return await stop(report, daemons, floor, floor_client)
    async with Client(str(workdir / "normal" / "assistant.sock")) as client:
        await prepare_assistant(client)
        steps = [{"sql": "INSERT INTO log (v) VALUES (?)", "bind": [f"s{i}"]} for i in range(5)]
        result = await measure(
            "db_proxy_transaction (5, NORMAL)",
            "assistant-normal",
            lambda: client.call("db_proxy_transaction", {"steps": steps}),
            normal,
            args,
            "synchronous=NORMAL",
            ping,
        )
        report.cases.append(result)
    async with Client(str(workdir / "gateway.sock")) as client:
        redeem = await redeem_case(client, args)
        result = await measure(
            "invites_redeem (fresh invites)", "gateway", redeem, gateway, args, floor=ping
        )
        report.cases.append(result)
        if args.sustained:
            print("sustained redemptions (20 s), then delivery alone ...", flush=True)
            report.sustained = await run_sustained(
                client, functools.partial(floor_rate, ping), result.par_calls_per_s
            )
    await stop(report, daemons, floor, floor_client)
    if report.sustained is not None:
        report.sustained.delivery_alone_per_s = await measure_delivery_alone(workdir)
    return report


async def stop(
    report: Report, daemons: list[Daemon], floor: Daemon, floor_client: FloorClient
) -> Report:
    for daemon in daemons:
        report.rss_kib[daemon.name] = daemon.rss()
    for daemon in daemons:
        daemon.stop()
    await floor_client.aclose()
    floor.proc.terminate()
    return report


async def measure_bare(workdir: Path, args: argparse.Namespace, ping: Floor) -> CaseResult:
    """The second floor (`bench.bare`): the point query answered by a bare server on the
    assistant's database, through the same client as the assistant's case."""
    bare = Daemon(
        "bare",
        ["-m", "bench.bare", str(workdir / "bare.sock"), str(workdir / "assistant.db")],
        workdir,
    )
    bare.wait_ready()
    try:
        async with Client(str(workdir / "bare.sock")) as client:
            return await measure(
                "bare server: point query", "bare", lambda: point_query(client), bare, args,
                "2nd floor", ping,
            )  # fmt: skip
    finally:
        bare.stop()


async def floor_rate(ping: Floor) -> float:
    rate, _ = await concurrent(ping.call, 1.0)
    return rate


async def measure_delivery_alone(workdir: Path) -> float:
    """Both daemons down, QUEUED events in the outbox, then both up: the gateway's drain rate."""
    queue_events(workdir / "gateway.db", QUEUED)
    args = ["--runtime-dir", str(workdir), "--state-dir", str(workdir)]
    assistant = Daemon("assistant-again", ["-m", "pair.assistant", *args], workdir)
    assistant.wait_ready()
    gateway = Daemon("gateway-again", ["-m", "pair.gateway", *args], workdir)
    gateway.wait_ready()
    try:
        return await delivery_alone(str(workdir / "gateway.sock"))
    finally:
        gateway.stop()
        assistant.stop()


ROWS = 10_000


async def prepare_assistant(client: Client) -> None:
    await client.call(
        "db_proxy",
        {
            "sql": "CREATE TABLE kv (id INTEGER PRIMARY KEY, v TEXT);"
            " CREATE TABLE log (id INTEGER PRIMARY KEY, v TEXT);"
            " CREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT);"
            " WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < 10000)"
            " INSERT INTO kv (id, v) SELECT n, 'value-' || n FROM s;"
            " INSERT INTO big (id, v) VALUES (1, printf('%.4096c', 'x'));",
            "mode": "exec",
        },
    )


POINT = {"sql": "SELECT v FROM kv WHERE id = ?", "mode": "query"}
_keys = itertools.count(1)


def point_query(client: Client) -> Awaitable[Any]:
    """One row of `kv` by its key, a different key each call."""
    return client.call("db_proxy", {**POINT, "bind": [next(_keys) % ROWS + 1]})


READ_CASES = frozenset(
    {"health", "db_proxy query (point, 10k rows)", "db_proxy query (4 KiB result)"}
)


def assistant_cases(
    client: Client, ping: Floor, ping_4k: Floor
) -> list[tuple[str, Call, Floor | None, str]]:
    insert = {"sql": "INSERT INTO log (v) VALUES (?)", "mode": "run", "bind": ["x"]}
    steps = [{"sql": "INSERT INTO log (v) VALUES (?)", "bind": [f"s{i}"]} for i in range(5)]
    big = {"sql": "SELECT v FROM big WHERE id = 1", "mode": "query"}
    batch = [BatchCall("health")] * 100

    return [
        ("health", lambda: client.call("health"), ping, ""),
        ("db_proxy query (point, 10k rows)", lambda: point_query(client), ping, ""),
        ("db_proxy run (insert)", lambda: client.call("db_proxy", insert), ping, "FULL"),
        (
            "db_proxy_transaction (5 steps)",
            lambda: client.call("db_proxy_transaction", {"steps": steps}),
            ping,
            "synchronous=FULL",
        ),
        ("db_proxy query (4 KiB result)", lambda: client.call("db_proxy", big), ping_4k, ""),
        ("100-call batch of health", lambda: client.batch(batch), None, "per batch"),
    ]


async def redeem_case(client: Client, args: argparse.Namespace) -> Call:
    """Redemptions of fresh invites, one per call, each by a new sender."""
    contact = (await client.call("contacts_create", {"displayName": "Bench"}))["contact"]["id"]
    needed = args.warmup + args.repeat * (args.calls + int(args.seconds * 20_000))
    uses = 1000
    codes: list[str] = []
    for _ in range(needed // uses + 1):
        created = await client.call(
            "invites_create", {"contactId": contact, "sourceChannel": "bench", "maxUses": uses}
        )
        codes += [created["code"]] * uses
    senders = iter(range(1 << 62))
    pool = iter(codes)

    def redeem() -> Awaitable[Any]:
        params = {
            "sourceChannel": "bench",
            "code": next(pool),
            "externalUserId": f"u{next(senders)}",
        }
        return client.call("invites_redeem", params)

    return redeem


async def wait_for_socket(path: Path) -> None:
    while True:
        try:
            _, writer = await asyncio.open_unix_connection(str(path))
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return


def print_table(report: Report) -> None:
    header = (
        f"{'case':<34} {'seq p50 us':>10} {'p99 us':>8} {'x floor':>7}"
        f" {'64 in flight/s':>14} {'floor/s':>8} {'x floor':>7}"
        f" {'srv cpu us':>10} {'x floor':>7}"
    )
    print("\n" + header)
    print("-" * len(header))
    for case in report.cases:
        print(
            f"{case.name:<34} {case.seq_p50_us:>10.1f} {case.seq_p99_us:>8.1f}"
            f" {fmt(case.ratio_seq_p50):>7} {case.par_calls_per_s:>14,.0f}"
            f" {fmt(case.floor_par_calls_per_s):>8} {fmt(case.ratio_par):>7}"
            f" {fmt(case.server_cpu_us_per_call):>10} {fmt(case.ratio_cpu):>7}"
        )
    print(
        "x floor: this case over the floor runs paired with its runs (median of the pairs);"
        " floor/s is the median of those floor runs."
    )
    for name, rss in report.rss_kib.items():
        print(
            f"{name}: RSS {rss.get('VmRSS', 0) / 1024:.1f} MiB,"
            f" peak {rss.get('VmHWM', 0) / 1024:.1f} MiB"
        )
    for fairness in (report.fairness, report.backup):
        if fairness is not None:
            print("\n" + "\n".join(fairness.lines()))
    if report.sustained is not None:
        print("\n" + "\n".join(report.sustained.lines()))


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,g}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per run")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of a 64-in-flight run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--no-loop-reads",
        dest="loop_reads",
        action="store_false",
        help="run the assistant with --no-loop-reads",
    )
    parser.add_argument(
        "--reads-only",
        action="store_true",
        help="only the floors, health, the queries and fairness (issue 33's cases)",
    )
    parser.add_argument(
        "--no-sustained",
        dest="sustained",
        action="store_false",
        help="skip the 20 s sustained-redemption run and the delivery-alone run",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-", dir="/tmp") as tmp:
        report = uvloop.run(run(args, Path(tmp)))
    print_table(report)
    out = args.out or Path("bench/results") / f"{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
