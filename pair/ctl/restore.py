"""`pairctl restore`: a bundle's files in place of the state directory's, all or nothing.

The protocol (the lock, the marker, the swap, what is kept aside) is
`pair.runtime.restore`, which the daemons read too. Here: under the lock, every
file of the bundle is read once into a private copy (0600, `<name>.restoring`),
hashed as it is copied and compared with the manifest; the databases are
checked as copied; only then is the marker written and the swap made.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from pair.ctl.bundle import BundleError, Manifest, read_manifest
from pair.ctl.checks import Check, checked_copies, copied_name
from pair.runtime.files import Dir, copy_hashed, hash_of, private_dir
from pair.runtime.restore import (
    ALL_FILES,
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
    was done. `running` says which daemon still answers, checked right before the swap.

    The copies are made and checked in a directory of pairctl's own beside `state`
    (the daemon user owns `state`: what it could swap there, SQLite would open by
    name); they are given to the state directory's owner and moved in only once every
    check has passed."""
    with lock_for_restore(state):
        _refuse_pending(state)
        with private_dir(state.path.parent) as private:
            with Dir.open(path) as bundle:
                manifest = read_manifest(bundle)
                _check_room(private, manifest)
                checks = checked_copies(bundle, manifest, private)
            if not all(check.ok for check in checks):
                raise Refused(checks)
            daemon = running()
            if daemon is not None:
                raise RestoreError(f"{daemon}: stop both daemons and their sockets first")
            _move_in(private, state)
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


def _check_room(private: Dir, manifest: Manifest) -> None:
    """Refused before anything is copied: too little room for the copies."""
    needed = sum(file.bytes for file in manifest.files) + SPARE_BYTES
    free = private.free_bytes()
    if free < needed:
        raise BundleError(
            f"the restore needs {needed} bytes beside {private.path.parent} and {free} are"
            " free; nothing was changed"
        )


def _move_in(private: Dir, state: Dir) -> None:
    """Each checked copy into `state` as `<name>.restoring`, given to its owner."""
    found = state.stat()
    try:
        for name in ALL_FILES:
            if os.geteuid() == 0:
                with private.open_regular(copied_name(name)) as copy:
                    os.fchown(copy.fileno(), found.st_uid, found.st_gid)
            state.unlink(name + INCOMING, missing_ok=True)
            try:
                private.rename(copied_name(name), name + INCOMING, into=state)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                _copy_across(private, name, state, (found.st_uid, found.st_gid))
        state.sync()
    except BaseException:
        _remove_copies(state)
        raise


def _copy_across(private: Dir, name: str, state: Dir, owner: tuple[int, int]) -> None:
    """The state directory is a file system of its own: the checked copy is copied
    again, from pairctl's own directory, and must hash the same."""
    with private.open_regular(copied_name(name)) as source:
        expected = hash_of(source)
        source.seek(0)
        with state.create(name + INCOMING) as out:
            if os.geteuid() == 0:
                os.fchown(out.fileno(), *owner)
            if copy_hashed(source, out) != expected:
                raise BundleError(f"{private.path / name} changed while it was copied")


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
