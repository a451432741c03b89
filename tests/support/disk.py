"""Disks a test can fill: a small tmpfs of its own (mounting one needs root)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest


@contextlib.contextmanager
def small_disk(path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs at `path`: a disk the test can fill up and free again."""
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def disk_full(disk: Path, database: Path) -> Iterator[None]:
    """Fill `disk` to the last byte, with `database`'s WAL emptied first so no write fits."""
    db = apsw.Connection(str(database))
    db.set_busy_timeout(5000)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(size))
    finally:
        os.close(fd)
    try:
        yield
    finally:
        filler.unlink()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
