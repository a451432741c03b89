"""Every open, create, rename and unlink of a path another user could influence.

pairctl runs as root on directories the daemon user owns (the state directory
and its backup/), on bundles anyone may have handed it and on an output
directory the operator names; the daemons write their key and snapshots there.
So a path is looked up once, as a directory opened without following links
(`Dir.open`); after that every name is one component relative to that
directory's descriptor: created with O_EXCL|O_NOFOLLOW (0600 by default),
opened with O_NOFOLLOW and checked by fstat to be a regular file, renamed by
directory descriptors, and made durable by an fsync of the directory.

Stdlib only: pairctl imports it without apsw.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import pwd
import secrets
import stat
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import BinaryIO

from pair.runtime import powercut

CHUNK = 1 << 20
# O_NONBLOCK: a FIFO planted where a directory belongs is refused, never waited on.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Group or others may write: another user could rename or replace what is in it.
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


class UnsafePath(Exception):
    """Raised when a path is not what it must be: a link, a FIFO or device where a
    regular file belongs, another user's, writable by others, or a name of more than
    one component. The message names the path, and its owner when that is why."""


def owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_name(name: str) -> str:
    """`name` when it is one component of a path (no `/`, not `.` or `..`)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafePath(f"{name!r} is not a file name")
    return name


class Dir:
    """An open directory; the names given to its methods are relative to it."""

    __slots__ = ("created", "fd", "path")

    def __init__(self, path: Path, fd: int, *, created: bool = False) -> None:
        self.path = path
        self.fd = fd
        self.created = created

    @classmethod
    def open(
        cls, path: Path | str, *, trusted: Collection[int] | None = None, create: bool = False
    ) -> Dir:
        """Open the directory at `path`; never through a link in its last component.

        With `trusted` (uids), every directory from `/` down must belong to one of
        them, and none may be writable by others unless it is sticky (like /tmp),
        the last one not at all: ssh's StrictModes. With `create`, a missing last
        component is made (0700)."""
        path = Path(os.path.abspath(path))
        parent = Path(os.path.realpath(path.parent))
        fd = os.open(parent, _DIR_FLAGS) if trusted is None else _walk(parent, frozenset(trusted))
        try:
            child = cls(parent, fd).subdir(path.name, create=create, trusted=trusted)
        finally:
            os.close(fd)
        return child

    def subdir(
        self,
        name: str,
        *,
        create: bool = False,
        mode: int = 0o700,
        trusted: Collection[int] | None = None,
    ) -> Dir:
        """The directory `name` in this one (made with `mode` when `create` and missing);
        checked against `trusted` as `Dir.open` checks its last component."""
        created = False
        if create:
            try:
                os.mkdir(check_name(name), mode, dir_fd=self.fd)
                created = True
            except FileExistsError:
                pass
        fd = self._open(name, _DIR_FLAGS, "a directory")
        sub = Dir(self.path / name, fd, created=created)
        if trusted is not None:
            try:
                _check_dir(sub.path, os.fstat(fd), frozenset(trusted), last=True)
            except BaseException:
                sub.close()
                raise
        return sub

    def create(self, name: str, mode: int = 0o600) -> BinaryIO:
        """A new regular file `name`, open for writing; never an existing name or a link."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(check_name(name), flags, mode, dir_fd=self.fd)
        # The umask may have taken bits `mode` asks for (a metrics file others read).
        os.fchmod(fd, mode)
        if powercut.ENABLED:
            powercut.file_created(str(self.path / name))
        return os.fdopen(fd, "wb")

    def open_regular(self, name: str, *, owner: int | None = None) -> BinaryIO:
        """`name` open for reading when it is a regular file (owned by `owner`, when
        given): a link, FIFO, socket, device or directory is refused, never waited on."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = self._open(name, flags, "a regular file")
        try:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode):
                raise UnsafePath(
                    f"{self.path / name} is {_kind(found.st_mode)}, not a regular file"
                )
            if owner is not None and found.st_uid != owner:
                raise UnsafePath(
                    f"{self.path / name} belongs to {owner_name(found.st_uid)},"
                    f" not {owner_name(owner)}"
                )
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb")

    def read_small(self, name: str, limit: int) -> bytes:
        """The whole of the regular file `name`, refused past `limit` bytes."""
        with self.open_regular(name) as file:
            data = file.read(limit + 1)
        if len(data) > limit:
            raise UnsafePath(f"{self.path / name} is larger than {limit} bytes")
        return data

    def rename(self, old: str, new: str, *, into: Dir | None = None) -> None:
        """Rename `old` to `new` (in `into`, when given); replaces a file at `new`."""
        target = self if into is None else into
        os.rename(check_name(old), check_name(new), src_dir_fd=self.fd, dst_dir_fd=target.fd)

    def unlink(self, name: str, *, missing_ok: bool = False) -> None:
        try:
            os.unlink(check_name(name), dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmdir(self, name: str) -> None:
        os.rmdir(check_name(name), dir_fd=self.fd)

    def remove_tree(self, name: str) -> None:
        """Remove the directory `name` and all in it, following no link and opening
        nothing but directories (each by O_DIRECTORY|O_NOFOLLOW)."""
        with self.subdir(name) as inside:
            for entry in inside.names():
                found = inside.lstat(entry)
                if found is not None and stat.S_ISDIR(found.st_mode):
                    inside.remove_tree(entry)
                else:
                    inside.unlink(entry, missing_ok=True)
        self.rmdir(name)

    def lstat(self, name: str) -> os.stat_result | None:
        """What `name` is (a link is a link), or None when there is nothing of that name."""
        try:
            return os.stat(check_name(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def free_bytes(self) -> int:
        found = os.fstatvfs(self.fd)
        return found.f_bavail * found.f_frsize

    def sync(self) -> None:
        """Make the names in this directory (a rename, a new file) survive a power cut."""
        if powercut.ENABLED:
            if powercut.skipped("dir-sync"):
                return
            powercut.dir_synced(self.fd)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Dir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dir({str(self.path)!r})"

    def _open(self, name: str, flags: int, what: str) -> int:
        try:
            return os.open(check_name(name), flags, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                found = self.lstat(name)
                kind = "not there" if found is None else _kind(found.st_mode)
                raise UnsafePath(f"{self.path / name} is {kind}, not {what}") from exc
            raise


def fsync(file: BinaryIO) -> None:
    """fsync an open file (flushed): its content, as it is now, survives a power cut."""
    os.fsync(file.fileno())
    if powercut.ENABLED:
        powercut.file_synced(file.fileno())


def copy_hashed(source: BinaryIO, target: BinaryIO, *, limit: int | None = None) -> tuple[int, str]:
    """Copy `source` to `target`, hashing what was read, and fsync `target`: the size
    and sha256 of exactly the bytes written (a file is read once). With `limit`, at
    most `limit + 1` bytes are copied: a file that grows while it is read stops there."""
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(CHUNK if limit is None else min(CHUNK, limit + 1 - size)):
        digest.update(chunk)
        target.write(chunk)
        size += len(chunk)
    target.flush()
    fsync(target)
    return size, digest.hexdigest()


def hash_of(source: BinaryIO) -> tuple[int, str]:
    """The size and sha256 of what is left to read in `source`."""
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def replace_atomically(directory: Dir, name: str, data: bytes, *, mode: int = 0o600) -> None:
    """`name` holds `data`, whole, after a power cut too: written under a temporary name,
    fsynced, renamed over `name`, and the directory fsynced. A reader never sees half."""
    temporary = f".{check_name(name)}.{secrets.token_hex(4)}.tmp"
    try:
        with directory.create(temporary, mode) as file:
            file.write(data)
            file.flush()
            fsync(file)
        directory.rename(temporary, name)
    except BaseException:
        with contextlib.suppress(OSError):
            directory.unlink(temporary, missing_ok=True)
        raise
    directory.sync()


@contextlib.contextmanager
def private_dir(beside: Path | None = None) -> Iterator[Dir]:
    """A new directory of this user's alone (0700), in `beside` (a directory already
    trusted) or the system's temporary one, removed with all in it when left: where a
    file is checked by name (SQLite opens by name) with no one else able to swap it."""
    path = Path(tempfile.mkdtemp(prefix=".pair-private-", dir=beside))
    try:
        with Dir.open(path) as private:
            yield private
    finally:
        with Dir.open(path.parent) as parent:
            parent.remove_tree(path.name)


def _walk(path: Path, trusted: frozenset[int]) -> int:
    """`path` opened component by component from `/`, each checked as it is passed."""
    fd = os.open("/", _DIR_FLAGS)
    walked = Path("/")
    try:
        for part in path.parts[1:]:
            _check_dir(walked, os.fstat(fd), trusted, last=False)
            walked = walked / part
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(f"{walked} is not a directory") from exc
                raise
            os.close(fd)
            fd = child
        _check_dir(walked, os.fstat(fd), trusted, last=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_dir(path: Path, found: os.stat_result, trusted: frozenset[int], *, last: bool) -> None:
    if found.st_uid not in trusted:
        allowed = ", ".join(owner_name(uid) for uid in sorted(trusted))
        raise UnsafePath(
            f"refusing {path}: it belongs to {owner_name(found.st_uid)}, not to {allowed}"
        )
    if found.st_mode & _OTHERS_WRITE and (last or not found.st_mode & stat.S_ISVTX):
        raise UnsafePath(
            f"refusing {path}: other users can write in it (mode {stat.filemode(found.st_mode)});"
            f" chmod go-w {path}"
        )


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISLNK: "a symbolic link",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISDIR: "a directory",
        stat.S_ISREG: "a regular file",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "not a regular file")
