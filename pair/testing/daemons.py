"""Real daemon processes for tests: started, awaited through sd_notify, called, signalled.

The handle API is SPEC.md section 9's (`socket_path`, `state_dir`, `pid`,
`call`, `stop`, `kill`, `start`, `restart`, `logs`); the rest serves the
project's own tests (signals, socket handover, a launcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pair import DAEMONS
from pair.protocol.client import Client
from pair.protocol.errors import IpcError

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
CALL_TIMEOUT = 10.0
# Signals a test sends to end the daemon: its exit afterwards is not a crash.
_STOPPING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGKILL})
LOG_TAIL_LINES = 40


class DaemonProcess:
    """One daemon subprocess with its own NOTIFY_SOCKET, so readiness is READY=1, not a sleep."""

    def __init__(
        self,
        module: str,
        runtime_dir: Path,
        state_dir: Path,
        *extra_args: str,
        env: dict[str, str] | None = None,
        inherit: tuple[int, str] | None = None,
        launcher: tuple[str, ...] = (),
        socket_name: str | None = None,
        python: tuple[str, ...] = (sys.executable,),
    ) -> None:
        self.module = module_of(module)
        self.name = module.rsplit(".", 1)[-1]
        self.socket_path = str(runtime_dir / f"{socket_name or self.name}.sock")
        self.runtime_dir = runtime_dir
        self.state_dir = state_dir
        self.extra_args = list(extra_args)
        self.env = env or {}
        # (fd, name): hand a listening socket over as systemd does: on fd 3,
        # with LISTEN_FDS=1, LISTEN_FDNAMES and LISTEN_PID set to the daemon's pid.
        self.inherit = inherit
        # A program that runs the daemon for us (systemd-socket-activate ...).
        self.launcher = launcher
        # The interpreter (and its flags) that runs the module: another release's venv.
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = str(runtime_dir / f".{module.rsplit('.', 1)[-1]}-notify")
        self.notify_sock: socket.socket | None = None
        self.messages: list[str] = []
        self.stderr_path = runtime_dir / f"{module.rsplit('.', 1)[-1]}.stderr"
        # Stopped or killed on purpose (by the test): its exit is not a crash.
        self.expected_down = False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, wait: bool = True) -> DaemonProcess:
        """Start the process; with `wait`, return once it has sent READY=1."""
        if self.running():
            raise RuntimeError(f"{self.name}d is already running (pid {self.pid})")
        self.expected_down = False
        self._open_notify_socket()
        env = {
            **os.environ,
            "NOTIFY_SOCKET": self.notify_path,
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        args = [
            *self.launcher,
            *self.python,
            "-m",
            self.module,
            "--runtime-dir",
            str(self.runtime_dir),
            "--state-dir",
            str(self.state_dir),
            *self.extra_args,
        ]
        pass_fds: tuple[int, ...] = ()
        if self.inherit is not None:
            fd, name = self.inherit
            pass_fds = (fd,)
            handover = (
                "import os, sys;"
                f"os.dup2({fd}, 3, inheritable=True); os.close({fd});"
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1',"
                f" LISTEN_FDNAMES={name!r});"
                "os.execv(sys.executable, sys.argv[1:])"
            )
            args = [sys.executable, "-c", handover, *args]
        stderr = self.stderr_path.open("ab")
        self.proc = subprocess.Popen(
            args, env=env, stderr=stderr, stdout=subprocess.DEVNULL, pass_fds=pass_fds
        )
        stderr.close()
        if wait:
            self.wait_for("READY=1")
        return self

    def _open_notify_socket(self) -> None:
        if self.notify_sock is not None:
            self._discard_old_messages()
            return
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.bind(self.notify_path)

    def _discard_old_messages(self) -> None:
        """A previous process's READY=1 must not pass for this one's."""
        assert self.notify_sock is not None
        self.notify_sock.setblocking(False)
        try:
            while True:
                self.notify_sock.recv(4096)
        except BlockingIOError:
            pass
        finally:
            self.notify_sock.setblocking(True)
        self.messages.clear()

    def wait_for(self, line: str, timeout: float = READY_TIMEOUT) -> None:
        """Block until the daemon sends `line` to NOTIFY_SOCKET; fail if it exits first."""
        assert self.notify_sock is not None
        deadline = time.monotonic() + timeout
        while not any(line in message.split("\n") for message in self.messages):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.module} exited with {self.proc.returncode} before {line}: "
                    f"{self.stderr()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.module} did not send {line}: {self.stderr()}")
            self.notify_sock.settimeout(min(remaining, 0.1))
            try:
                self.messages.append(self.notify_sock.recv(4096).decode())
            except TimeoutError:
                continue

    def stderr(self) -> str:
        """What the daemon has written to stderr so far, across restarts."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    logs = stderr

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.stderr().splitlines()[-lines:])

    def call(self, method: str, params: object = None, timeout: float = CALL_TIMEOUT) -> Any:
        """One strict call on a connection of its own: the result, or `IpcHandlerError` /
        `IpcTransportError` raised. Synchronous, so it also works from a test with no loop;
        the call runs on a thread of its own, with its own event loop."""

        __tracebackhide__ = True

        async def once() -> Any:
            async with Client(self.socket_path, timeout=timeout) as client:
                return await client.call(method, params)

        try:
            return _CALLS.submit(asyncio.run, once()).result()
        except IpcError as exc:
            # Raised again here, without the frames of the call's thread and loop: a
            # failing test shows its own line and the error, not asyncio's internals.
            raise exc.with_traceback(None) from None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        if signum in _STOPPING:
            self.expected_down = True
        self.proc.send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        self.expected_down = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and wait."""
        assert self.proc is not None
        self.expected_down = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    def restart(self) -> DaemonProcess:
        """Stop (SIGTERM) if it runs, then start again on the same socket and state."""
        if self.running():
            self.stop()
        self.messages.clear()
        return self.start()

    def stop_checked(self) -> str | None:
        """SIGTERM and wait; what was wrong (it had crashed, did not stop in time, or did
        not exit 0), with the tail of its log, or None. Closed after, whatever happened."""
        try:
            if self.proc is None:
                return None
            if self.proc.poll() is not None:
                return None if self.expected_down else _problem(self, "crashed")
            try:
                code = self.stop()
            except subprocess.TimeoutExpired:
                return _problem(self, f"did not stop within {STOP_TIMEOUT}s of SIGTERM")
            return None if code == 0 else _problem(self, "did not exit 0 on SIGTERM")
        finally:
            self.close()

    def __enter__(self) -> DaemonProcess:
        return self if self.running() else self.start()

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        _raise_if(kind, [self.stop_checked()])

    @contextlib.contextmanager
    def checked(self) -> Iterator[DaemonProcess]:
        """The daemon as the test starts it (later, or another way); stopped and
        checked on leaving, as `with DaemonProcess(...)` does."""
        try:
            yield self
        except BaseException:
            self.stop_checked()
            raise
        _raise_if(None, [self.stop_checked()])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        if self.notify_sock is not None:
            self.notify_sock.close()
            self.notify_sock = None


def module_of(daemon: str) -> str:
    """The module `python -m` runs for a daemon's name ("assistant"), or a module given whole."""
    return f"pair.{daemon}" if daemon in DAEMONS else daemon


def run_once(module: str, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a daemon that is expected to exit on its own (a start-up failure)."""
    return subprocess.run(
        [sys.executable, "-m", module_of(module), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# One thread at a time runs `DaemonProcess.call`: a call from an async test blocks its
# loop anyway, and the thread's own loop must not be the test's.
_CALLS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pair-call")


class Pair:
    """Both daemons on one runtime dir, as `make run` starts them; each may be given a state
    dir of its own (one on a small disk, say) and flags of its own."""

    def __init__(
        self,
        root: Path,
        gateway_args: tuple[str, ...] = (),
        *,
        assistant_args: tuple[str, ...] = (),
        assistant_state: Path | None = None,
        gateway_state: Path | None = None,
    ) -> None:
        self.root = root
        self.runtime = root / "run"
        self.state = root / "state"
        self.runtime.mkdir(exist_ok=True)
        self.assistant = DaemonProcess(
            "assistant", self.runtime, assistant_state or self.state, *assistant_args
        )
        gateway_state = gateway_state or self.state
        self.gateway = DaemonProcess("gateway", self.runtime, gateway_state, *gateway_args)
        self.gateway_db = gateway_state / "gateway.db"

    @property
    def daemons(self) -> tuple[DaemonProcess, DaemonProcess]:
        return (self.assistant, self.gateway)

    @property
    def gateway_socket(self) -> str:
        return self.gateway.socket_path

    @property
    def assistant_socket(self) -> str:
        return self.assistant.socket_path

    def start(self) -> Pair:
        """The assistant, then the gateway, each ready (READY=1)."""
        self.assistant.start()
        self.gateway.start()
        return self

    def close(self) -> None:
        """Kill what still runs (no checks: see `stop_checked`)."""
        self.gateway.close()
        self.assistant.close()

    def stop_checked(self) -> list[str]:
        """SIGTERM the gateway, then the assistant, and wait; a line per daemon that had
        crashed or did not exit 0, with the tail of its log."""
        problems = [daemon.stop_checked() for daemon in (self.gateway, self.assistant)]
        return [problem for problem in problems if problem is not None]

    def __enter__(self) -> Pair:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        _raise_if(kind, self.stop_checked())

    @contextlib.contextmanager
    def checked(self) -> Iterator[Pair]:
        """The pair as the test starts it (one daemon first, say); stopped and checked
        on leaving, as `with Pair(...)` does."""
        try:
            yield self
        except BaseException:
            self.stop_checked()
            raise
        _raise_if(None, self.stop_checked())


@contextlib.contextmanager
def crash_at(daemon: DaemonProcess, failpoint: str, timeout: float = 30.0) -> Iterator[None]:
    """Arm `failpoint` (pair.runtime.failpoints) in `daemon` for what the block starts;
    on leaving, the daemon must have killed itself there (SIGKILL), and it is disarmed
    for its next start."""
    daemon.env["PAIR_FAILPOINT"] = failpoint
    try:
        yield
        assert daemon.proc is not None, f"{daemon.name}d was never started"
        code = daemon.proc.wait(timeout)
        if code != -signal.SIGKILL:
            raise DaemonsFailed(f"{daemon.name}d did not reach {failpoint} (exit code {code})")
        daemon.expected_down = True
    finally:
        del daemon.env["PAIR_FAILPOINT"]


class DaemonsFailed(AssertionError):
    """Raised when a test's daemons did not end as they should: every daemon a test starts
    must exit 0 on SIGTERM (or have been stopped or killed by the test itself)."""


def _raise_if(kind: type[BaseException] | None, problems: Sequence[str | None]) -> None:
    found = [problem for problem in problems if problem is not None]
    # A test that already failed keeps its own error; the daemons' is in their logs.
    if found and kind is None:
        raise DaemonsFailed("\n\n".join(found))


def _problem(daemon: DaemonProcess, what: str) -> str:
    code = daemon.proc.returncode if daemon.proc is not None else None
    return f"{daemon.name}d {what} (exit code {code}); the end of its log:\n{daemon.log_tail()}"
