"""The disk as a power cut leaves it, rebuilt from the shadow `pair.runtime.powercut`
kept: each directory with the entries of its last fsync, each file with the content of
its last fsync. By seed, sectors written since are kept or dropped one by one (torn at
512 bytes), as SQLite's crash VFS does (test6.c)."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

SECTOR = 512


def key_of(path: Path) -> str:
    found = os.lstat(path)
    return f"{found.st_dev}_{found.st_ino}"


def baseline(root: Path, shadow: Path) -> None:
    """Everything under `root` as it is now is on the disk (the tier starts from here)."""
    (shadow / "files").mkdir(parents=True, exist_ok=True)
    (shadow / "dirs").mkdir(parents=True, exist_ok=True)
    for directory, subdirs, names in os.walk(root):
        entries = {}
        for name in [*names, *subdirs]:
            path = Path(directory) / name
            found = os.lstat(path)
            if stat.S_ISREG(found.st_mode):
                entries[name] = ["file", key_of(path)]
                (shadow / "files" / key_of(path)).write_bytes(path.read_bytes())
            elif stat.S_ISDIR(found.st_mode):
                entries[name] = ["dir", key_of(path)]
        (shadow / "dirs" / f"{key_of(Path(directory))}.json").write_text(json.dumps(entries))


def rebuild(shadow: Path, root: Path, out: Path, rng: random.Random | None) -> list[str]:
    """The tree under `root` as the disk holds it after the cut, written at `out`; with
    `rng`, unsynced sectors of files still at the same name kept by chance. What was
    kept, a line each."""
    kept: list[str] = []
    _rebuild(shadow, key_of(root), root, out, rng, kept)
    return kept


def _rebuild(
    shadow: Path, key: str, real: Path | None, out: Path, rng: random.Random | None, kept: list[str]
) -> None:
    out.mkdir(mode=0o700)
    listing = shadow / "dirs" / f"{key}.json"
    entries = json.loads(listing.read_text()) if listing.exists() else {}
    for name, (kind, inode) in entries.items():
        here = None if real is None else real / name
        if kind == "dir":
            same = here is not None and here.is_dir() and key_of(here) == inode
            _rebuild(shadow, inode, here if same else None, out / name, rng, kept)
            continue
        durable = shadow / "files" / inode
        content = durable.read_bytes() if durable.exists() else b""
        if rng is not None and here is not None and here.is_file() and key_of(here) == inode:
            merged = merge(content, here.read_bytes(), rng)
            if merged != content:
                kept.append(f"{out / name}: {len(merged) - len(content):+d} bytes unsynced kept")
            content = merged
        (out / name).write_bytes(content)
        (out / name).chmod(0o600)


def merge(durable: bytes, current: bytes, rng: random.Random) -> bytes:
    """`durable` with some of the sectors in which `current` differs taken from it: each
    unsynced sector reached the disk or did not; a longer file grows only through a
    prefix of its new sectors that all did."""
    chance = rng.choice((0.0, 0.3, 0.7, 1.0))
    out = bytearray(durable)
    for start in range(0, min(len(durable), len(current)), SECTOR):
        theirs = current[start : start + SECTOR]
        if theirs != durable[start : start + SECTOR] and rng.random() < chance:
            out[start : start + len(theirs)] = theirs
    grown = len(durable)
    while grown < len(current) and rng.random() < chance:
        end = min(len(current), (grown // SECTOR + 1) * SECTOR)
        out[grown:end] = current[grown:end]
        grown = end
    return bytes(out)
