"""Where a daemon's listening socket comes from: a path it binds, or systemd.

In self-bind mode the daemon owns the file: it probes a leftover one (a live
listener is an error, a dead one is removed), binds with mode 0600 (or the
configured mode), and on exit removes the file only if it is still the one
it bound. An inherited socket is never unlinked or rebound.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
from dataclasses import dataclass

from pair.runtime.errors import EX_CANTCREAT, EX_CONFIG, EX_TEMPFAIL, ListenerError
from pair.runtime.systemd import listen_fds

# sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
PROBE_TIMEOUT = 1.0


@dataclass(slots=True)
class Listener:
    sock: socket.socket
    path: str
    inherited: bool
    inode: int | None = None

    def close(self) -> None:
        """Close; in self-bind mode also remove the file, if it is still ours."""
        self.sock.close()
        if self.inherited or self.inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)


def check_socket_path(path: str) -> None:
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ListenerError(
            f"socket path is {size} bytes, above the AF_UNIX limit of "
            f"{MAX_SOCKET_PATH_BYTES}: {path} (choose a shorter --runtime-dir or --socket)",
            EX_CONFIG,
        )


def open_listener(
    path: str,
    *,
    daemon_name: str,
    mode: int = 0o600,
    group: str | None = None,
    fd_name: str | None = None,
) -> Listener:
    """The inherited socket named `fd_name` (or the only one), else a fresh bind at `path`."""
    inherited = listen_fds()
    if inherited:
        chosen = [s for s in inherited if fd_name is None or s.name == fd_name] or inherited
        sock = chosen[0].sock
        name = sock.getsockname()
        return Listener(sock, name if isinstance(name, str) else path, inherited=True)
    check_socket_path(path)
    _make_runtime_dir(os.path.dirname(path) or ".")
    _clear_stale(path, daemon_name)
    return _bind(path, mode, group)


def _make_runtime_dir(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ListenerError(f"cannot create runtime dir {directory}: {exc}", EX_CANTCREAT) from exc


def _clear_stale(path: str, daemon_name: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; refusing to replace it", EX_CONFIG)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.ETIMEDOUT):
            raise ListenerError(f"cannot probe {path}: {exc}", EX_CONFIG) from exc
    finally:
        probe.close()
    raise ListenerError(f"another {daemon_name} is listening on {path}", EX_TEMPFAIL)


def _bind(path: str, mode: int, group: str | None) -> Listener:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # umask 0o177 makes the file 0600 from the start: no window in which
    # another user could connect before the chmod.
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot bind {path}: {exc}", EX_CANTCREAT) from exc
    finally:
        os.umask(old_umask)
    try:
        if group is not None:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, mode)
    except (OSError, KeyError) as exc:
        sock.close()
        os.unlink(path)
        raise ListenerError(f"cannot set owner/mode of {path}: {exc}", EX_CONFIG) from exc
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return Listener(sock, path, inherited=False, inode=os.stat(path).st_ino)
