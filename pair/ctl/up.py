"""`pairctl up`: both daemons in the foreground, restarted when they fail, logs prefixed.

Restart policy mirrors systemd's `Restart=on-failure`: a daemon that dies
(non-zero exit or a signal) is started again after a backoff that doubles
up to `RESTART_BACKOFF_CAP` and resets once it has stayed up for
`STABLE_AFTER` seconds; one that exits 0 was stopped on purpose and stays
down. A daemon that cannot start for a reason a restart cannot fix (its
socket served by another live daemon, a bad flag) stops both, once, and `up`
exits with its code. Ctrl-C (SIGINT) or SIGTERM stops both cleanly: SIGTERM to
each, SIGKILL only past `STOP_TIMEOUT` (above the daemons' 10 s drain grace).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream, Process

from pair import DAEMONS
from pair.runtime.errors import EX_CONFIG, EX_TEMPFAIL

RESTART_BACKOFF_START = 0.5
RESTART_BACKOFF_CAP = 10.0
STABLE_AFTER = 10.0
STOP_TIMEOUT = 15.0
# Start-up failures no restart can fix (runtime/errors.py).
FATAL = {EX_TEMPFAIL: "its socket is served by another live daemon", EX_CONFIG: "bad configuration"}


def say(line: str) -> None:
    print(f"{'pairctl':<9} | {line}", flush=True)


async def pump(name: str, stream: ByteReceiveStream) -> None:
    """Copy the daemon's log lines to our stdout, each prefixed with its name."""
    pending = b""
    async for chunk in stream:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            print(f"{name:<9} | {line.decode(errors='replace')}", flush=True)
    if pending:
        print(f"{name:<9} | {pending.decode(errors='replace')}", flush=True)


async def stop_on(stopping: anyio.Event, process: Process, scope: anyio.CancelScope) -> None:
    with scope:
        await stopping.wait()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(STOP_TIMEOUT):
            await process.wait()
            return
        say(f"pid {process.pid} did not stop within {STOP_TIMEOUT:g}s; killing it")
        process.kill()


async def run_once(name: str, argv: list[str], stopping: anyio.Event) -> int:
    async with await anyio.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as process:
        say(f"started {name} (pid {process.pid})")
        assert process.stderr is not None
        stopper = anyio.CancelScope()
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(pump, name, process.stderr)
            task_group.start_soon(stop_on, stopping, process, stopper)
            code = await process.wait()
            stopper.cancel()
            # The log pipe ends with the process, unless a child kept it open.
            task_group.cancel_scope.deadline = anyio.current_time() + 1
        return code


async def supervise(name: str, argv: list[str], stopping: anyio.Event) -> int:
    """Run `name` until stopped; a fatal start-up exit code, else 0."""
    delay = RESTART_BACKOFF_START
    while not stopping.is_set():
        started = time.monotonic()
        code = await run_once(name, argv, stopping)
        if stopping.is_set():
            say(f"{name} stopped (exit {code})")
            return 0
        if code == 0:
            say(f"{name} exited cleanly; not restarting it (like Restart=on-failure)")
            return 0
        if code in FATAL:
            say(f"{name} cannot start (exit {code}: {FATAL[code]}); stopping")
            stopping.set()
            return code
        if time.monotonic() - started >= STABLE_AFTER:
            delay = RESTART_BACKOFF_START
        how = f"signal {-code}" if code < 0 else f"exit {code}"
        say(f"{name} died ({how}); restarting in {delay:g}s")
        with anyio.move_on_after(delay):
            await stopping.wait()
        delay = min(delay * 2, RESTART_BACKOFF_CAP)
    return 0


async def wait_for_signal(stopping: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            say(f"received {signal.Signals(signum).name}: stopping both daemons")
            stopping.set()
            return


async def up(runtime_dir: Path, state_dir: Path, log_level: str) -> int:
    stopping = anyio.Event()
    common = ["--runtime-dir", str(runtime_dir), "--state-dir", str(state_dir)]
    common += ["--log-level", log_level]
    say(f"runtime dir {runtime_dir}, state dir {state_dir}; Ctrl-C stops both")
    codes: list[int] = []

    async def run(name: str) -> None:
        argv = [sys.executable, "-m", f"pair.{name}", *common]
        codes.append(await supervise(name, argv, stopping))

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(wait_for_signal, stopping)
        async with anyio.create_task_group() as daemons:
            for name in DAEMONS:
                daemons.start_soon(run, name)
        task_group.cancel_scope.cancel()
    return max(codes, default=0)


def run_up(runtime_dir: Path, state_dir: Path, log_level: str) -> int:
    return anyio.run(
        up,
        runtime_dir,
        state_dir,
        log_level,
        backend_options={"use_uvloop": sys.platform == "linux"},
    )
