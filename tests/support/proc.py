"""Real daemon processes for integration tests: started, awaited via sd_notify, signalled."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0


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
    ) -> None:
        self.module = module
        self.runtime_dir = runtime_dir
        self.state_dir = state_dir
        self.extra_args = list(extra_args)
        self.env = env or {}
        # (fd, name): hand a listening socket over as systemd does: on fd 3,
        # with LISTEN_FDS=1, LISTEN_FDNAMES and LISTEN_PID set to the daemon's pid.
        self.inherit = inherit
        # A program that runs the daemon for us (systemd-socket-activate ...).
        self.launcher = launcher
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = str(runtime_dir / f".{module.rsplit('.', 1)[-1]}-notify")
        self.notify_sock: socket.socket | None = None
        self.messages: list[str] = []
        self.stderr_path = runtime_dir / f"{module.rsplit('.', 1)[-1]}.stderr"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, wait: bool = True) -> DaemonProcess:
        self._open_notify_socket()
        env = {
            **os.environ,
            "NOTIFY_SOCKET": self.notify_path,
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        args = [
            *self.launcher,
            sys.executable,
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
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    def restart(self) -> DaemonProcess:
        self.messages.clear()
        return self.start()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        if self.notify_sock is not None:
            self.notify_sock.close()
            self.notify_sock = None


def run_once(module: str, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a daemon that is expected to exit on its own (a start-up failure)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
