"""The small part of systemd's daemon protocol we use: sd_notify, socket activation, watchdog.

In-house on purpose: the protocol is stable and tiny, and the PyPI options are
unmaintained or need libsystemd headers to build.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import anyio

SD_LISTEN_FDS_START = 3

log = logging.getLogger("runtime.systemd")


class Notifier:
    """Sends state lines to `NOTIFY_SOCKET`; every method is a no-op when it is unset."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._socket: socket.socket | None = None
        if self._address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def notify(self, *lines: str) -> None:
        """Send `KEY=value` lines in one datagram; failures are logged, never raised."""
        if self._socket is None or self._address is None:
            return
        try:
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self._address, exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self, status: str = "draining") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval() -> float | None:
    """Half of `WATCHDOG_USEC` in seconds when the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


async def run_watchdog(notifier: Notifier, interval: float) -> None:
    """Ping `WATCHDOG=1` from the event loop, so a stuck loop stops the pings."""
    while True:
        notifier.notify("WATCHDOG=1")
        await anyio.sleep(interval)


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    sock: socket.socket
    name: str


def listen_fds() -> list[InheritedSocket]:
    """The listening sockets passed by systemd (`LISTEN_FDS`), with their `LISTEN_FDNAMES`.

    Empty when the variables are absent or meant for another process
    (`LISTEN_PID` differs). The variables are removed so children do not
    mistake the sockets for theirs.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    if not pid or not count or pid != str(os.getpid()):
        return []
    name_list = names.split(":") if names else []
    inherited = []
    for index in range(int(count)):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        name = name_list[index] if index < len(name_list) else "unknown"
        inherited.append(InheritedSocket(sock, name))
    return inherited
