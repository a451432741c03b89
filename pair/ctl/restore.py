"""`pairctl restore`: a bundle's files in place of the state directory's, all or nothing.

The protocol (the lock, the marker, the swap, what is kept aside) is
`pair.runtime.restore`, which the daemons read too. Here: under the lock, every
file of the bundle is read once into a private copy (0600, `<name>.restoring`),
hashed as it is copied and compared with the manifest; the databases are
checked as copied; only then is the marker written and the swap made.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pair.ctl.bundle import BundleError, BundleFile, Manifest, read_manifest
from pair.ctl.checks import Check, check_database, cut_check, matches, size_problem_of
from pair.runtime.files import Dir, copy_hashed
from pair.runtime.restore import (
    ALL_FILES,
    DATABASES,
    INCOMING,
    KEPT_ASIDE,
    MARKER,
    Progress,
    RestoreError,
    finish,
    lock_for_restore,
    marker_of,
    swap,
    undo_swap,
    write_marker,
)

# Room kept free beyond the copies (the WAL the daemons start with, the marker).
SPARE_BYTES = 8 << 20


class Refused(Exception):
    """Raised when the bundle failed a check of its copies: nothing was changed."""

    def __init__(self, checks: list[Check]) -> None:
        super().__init__("the bundle failed its checks")
        self.checks = checks


def restore(path: Path, state: Dir, running: Callable[[], str | None]) -> tuple[list[Check], str]:
    """Restore the bundle at `path` into `state`; the checks made and a line of what
    was done. `running` says which daemon still answers, checked right before the swap."""
    with lock_for_restore(state):
        _refuse_pending(state)
        try:
            with Dir.open(path) as bundle:
                manifest = read_manifest(bundle)
                _check_room(bundle, state, manifest)
                checks = _copy_in(bundle, state, manifest)
            checks += _check_copies(state, manifest)
            if not all(check.ok for check in checks):
                raise Refused(checks)
            daemon = running()
            if daemon is not None:
                raise RestoreError(f"{daemon}: stop both daemons and their sockets first")
        except BaseException:
            _remove_copies(state)
            raise
        moved = _swap(state, str(path))
    line = f"restored {', '.join(ALL_FILES)} into {state.path}"
    if moved:
        line += f"; kept the replaced {', '.join(moved)} in {state.path / KEPT_ASIDE}"
    return checks, line


def resume(state: Dir) -> str:
    """Finish a swap cut short (the marker is there): it rolls forward."""
    with lock_for_restore(state):
        record = marker_of(state)
        if record is None:
            raise RestoreError(f"no restore into {state.path} was cut short: nothing to resume")
        progress = Progress()
        swap(state, ALL_FILES, progress)
        state.unlink(MARKER)
        state.sync()
    return f"finished the restore of {record.get('bundle')} into {state.path}"


def discard_kept(state: Dir) -> str:
    """`--finish`: the operator says the restored state is right; the replaced files go
    (the pair may run meanwhile: it never reads them)."""
    with lock_for_restore(state, beside_daemons=True):
        if marker_of(state) is not None:
            raise RestoreError(f"a restore into {state.path} was cut short: --resume it first")
        if not finish(state):
            return f"nothing kept aside in {state.path}"
    return f"removed {state.path / KEPT_ASIDE}, the files the last restore replaced"


def _refuse_pending(state: Dir) -> None:
    if marker_of(state) is not None:
        raise RestoreError(
            f"a restore into {state.path} was cut short ({state.path / MARKER} is there):"
            " finish it with `pairctl restore --resume` first"
        )
    if state.lstat(KEPT_ASIDE) is not None:
        raise RestoreError(
            f"{state.path / KEPT_ASIDE} holds the files an earlier restore replaced: once the"
            " pair is right, `pairctl restore --finish` removes them (or move them away)"
        )


def _check_room(bundle: Dir, state: Dir, manifest: Manifest) -> None:
    """Refused before anything is copied: too little room for the copies."""
    needed = sum(file.bytes for file in manifest.files) + SPARE_BYTES
    free = state.free_bytes()
    if free < needed:
        raise BundleError(
            f"the restore needs {needed} bytes in {state.path} and {free} are free;"
            " nothing was changed"
        )


def _copy_in(bundle: Dir, state: Dir, manifest: Manifest) -> list[Check]:
    found = state.stat()
    owner = (found.st_uid, found.st_gid) if os.geteuid() == 0 else None
    checks = []
    for file in manifest.files:
        incoming = file.name + INCOMING
        state.unlink(incoming, missing_ok=True)
        with bundle.open_regular(file.name) as source:
            _check_before_copy(bundle, file, source)
            with state.create(incoming) as out:
                if owner is not None:
                    os.fchown(out.fileno(), *owner)
                size, digest = copy_hashed(source, out)
        checks.append(matches(file, size, digest))
    return checks


def _check_before_copy(bundle: Dir, file: BundleFile, source: BinaryIO) -> None:
    """Refused before a byte is copied: not the manifest's size, or a database whose
    header disagrees with its size (a sparse gigabyte of zeros)."""
    size = os.fstat(source.fileno()).st_size
    if size != file.bytes:
        raise BundleError(
            f"{bundle.path / file.name} is {size} bytes, the manifest says {file.bytes}"
        )
    problem = size_problem_of(source) if file.name in DATABASES else None
    if problem is not None:
        raise BundleError(f"{bundle.path / file.name}: {problem}")


def _check_copies(state: Dir, manifest: Manifest) -> list[Check]:
    checks = [cut_check(manifest)]
    for daemon, database in manifest.databases.items():
        checks += check_database(state.path / (database.file + INCOMING), daemon, database)
    return checks


def _swap(state: Dir, bundle: str) -> list[str]:
    write_marker(state, bundle, ALL_FILES)
    progress = Progress()
    try:
        swap(state, ALL_FILES, progress)
    except OSError as exc:
        undo_swap(state, progress)
        _remove_copies(state)
        state.unlink(MARKER)
        state.sync()
        raise RestoreError(
            f"the swap failed ({exc.strerror or exc}); every file was put back as it was"
        ) from exc
    state.unlink(MARKER)
    state.sync()
    return progress.moved


def _remove_copies(state: Dir) -> None:
    for name in ALL_FILES:
        state.unlink(name + INCOMING, missing_ok=True)
