"""A real systemd, booted as PID 1 of new namespaces, that shares nothing writable with the host.

`boot.sh` (its PID 1 until it execs systemd) builds the root: an overlay of the
host's root file system over a tmpfs of the namespace, private `/run`, `/tmp`,
`/var/tmp` and `/dev`, read-only `/sys`, `/proc/sys` and checkout. The install writes
`/etc`, `/opt` and `/var/lib` there, and all of it goes when PID 1 is killed.
systemd's cgroups live in a cgroup of their own (`pair-systemd-test-*`), removed
after it.

Driving it: `Machine.run` enters every namespace of its PID 1 (`nsenter -a`).
Stopping it: SIGKILL of that PID 1, never a shutdown sequence.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.waiting import until

BOOT_SCRIPT = Path(__file__).with_name("boot.sh")
CHECKOUT = Path(__file__).resolve().parents[2]
TARGET = "pair-test.target"
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
TOOLS = ("unshare", "nsenter", "pivot_root", "findmnt", "runuser")
BOOT_TIMEOUT = 60.0
PREFIX = "/opt/pair"
POLL = 0.05
_BOOTS = itertools.count()


def why_not() -> str | None:
    """Why the real systemd cannot be booted here, or None when it can."""
    if os.geteuid() != 0:
        return "not root: new mount, PID and cgroup namespaces need it"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (Debian: util-linux)"
    if not Path("/lib/systemd/systemd").exists():
        return "no /lib/systemd/systemd (Debian: apt-get install systemd)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlay file system"
    absent = [str(root) for root in CGROUP_ROOTS if not root.is_dir()]
    if absent:
        return f"no cgroup hierarchy at {', '.join(absent)}"
    return None


class Machine:
    """One booted systemd; `run` executes a command inside it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.console = workdir / "console.log"
        self._mountpoint = Path(tempfile.mkdtemp(prefix="pair-systemd-"))
        name = f"pair-systemd-test-{os.getpid()}-{next(_BOOTS)}"
        self._cgroups = [root / name for root in CGROUP_ROOTS]
        self._unshare: subprocess.Popen[bytes] | None = None
        self.pid = 0
        # install.sh's; the package's is /usr/bin/pairctl.
        self.pairctl_path = f"{PREFIX}/bin/pairctl"

    def boot(self) -> None:
        self.console.touch()
        for cgroup in self._cgroups:
            cgroup.mkdir(exist_ok=True)
        enter = " && ".join(f"echo $$ > {cgroup}/cgroup.procs" for cgroup in self._cgroups)
        unshare = (
            "unshare --pid --fork --mount --uts --net --ipc --cgroup --propagation private"
            f" {BOOT_SCRIPT} {self._mountpoint} {TARGET} {self.console} {CHECKOUT}"
        )
        with (self.workdir / "boot.log").open("wb") as log:
            self._unshare = subprocess.Popen(
                ["/bin/sh", "-c", f"{enter} && exec {unshare}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self._pid_one()
        self._wait_for(Path(f"/proc/{self.pid}/root/run/systemd/private"))
        self.run("systemctl", "is-system-running", "--wait", timeout=BOOT_TIMEOUT)

    def _pid_one(self) -> int:
        assert self._unshare is not None
        children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self._unshare.poll() is not None:
                raise RuntimeError(f"boot failed: {(self.workdir / 'boot.log').read_text()}")
            with contextlib.suppress(FileNotFoundError):
                pids = children.read_text().split()
                if pids and Path(f"/proc/{pids[0]}/exe").resolve().name == "systemd":
                    return int(pids[0])
            time.sleep(POLL)
        raise RuntimeError("systemd did not start within the boot timeout")

    def _wait_for(self, path: Path) -> None:
        """Until systemd has made `path` (its bus socket: systemctl needs it)."""
        until(path.exists, f"systemd makes {path}", BOOT_TIMEOUT)

    def run(
        self,
        *argv: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the machine (as `user` through runuser), capturing its output."""
        result = subprocess.run(
            self.command(*argv, user=user),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def command(self, *argv: str, user: str | None = None) -> list[str]:
        """The host command line that runs `argv` inside the machine."""
        inside = ["runuser", "-u", user, "--", *argv] if user else list(argv)
        return ["nsenter", "-t", str(self.pid), "-a", "-r", "-w", *inside]

    def path(self, inside: str) -> Path:
        """A path of the machine, as the host reaches it."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def pairctl(self, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(self.pairctl_path, *args, user=user, check=False)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal_cursor(self) -> str:
        """The journal's end, once journald has stored every line sent before this call
        (it reads its sockets asynchronously: a "Started" sent earlier could land after)."""
        self.run("journalctl", "--sync")
        out = self.run("journalctl", "-n", "0", "--show-cursor", "-q").stdout
        return out.strip().removeprefix("-- cursor: ")

    def journal_after(self, cursor: str) -> list[dict[str, Any]]:
        """Every entry after `cursor`, up to every line sent before this call."""
        self.run("journalctl", "--sync")
        out = self.run("journalctl", f"--after-cursor={cursor}", "-o", "json", "-q").stdout
        return [json.loads(line) for line in out.splitlines()]

    def kill(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self._unshare is not None:
            self._unshare.wait(timeout=30)
        for cgroup in self._cgroups:
            _remove_cgroup(cgroup)
        with contextlib.suppress(OSError):
            self._mountpoint.rmdir()


def _remove_cgroup(cgroup: Path) -> None:
    """Remove an empty cgroup tree, deepest first (its processes died with PID 1)."""
    if not cgroup.is_dir():
        return
    deadline = time.monotonic() + 10
    for path in sorted((p for p in cgroup.rglob("*") if p.is_dir()), reverse=True):
        while True:
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                # A process of the namespace may still be exiting.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    cgroup.rmdir()
