"""pairctl backup, backup --verify, backup --list and restore [--resume | --finish].

The bundle is `bundle`, its checks `checks`, the restore `restore`. Here: the
command line's side, each failure one message with absolute paths.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import anyio
import msgspec

from pair.ctl import bundle, render
from pair.ctl.checks import Check, verify
from pair.ctl.failures import failed
from pair.ctl.restore import Refused, discard_kept, restore, resume
from pair.ctl.trust import check_owner, check_socket, trusted_owners
from pair.protocol.backup import BackupResult
from pair.protocol.client import Client
from pair.runtime.errors import EX_CANTCREAT, EX_HANDLER, EX_NOINPUT, EX_TEMPFAIL
from pair.runtime.failpoints import failpoint
from pair.runtime.files import Dir, UnsafePath
from pair.runtime.restore import RestoreError

# A snapshot's time grows with the database: minutes for gigabytes.
BACKUP_TIMEOUT = 3600.0


def take(into: Path, sockets: dict[str, str], as_json: bool) -> int:
    """A bundle in `into` (made, 0700, when missing): the gateway's snapshot, then the
    assistant's (`bundle`'s cut), checked, then named."""
    into = into.absolute()
    try:
        for address in sockets.values():
            check_socket(address)
        # Root's bundles go where only root (or who runs pairctl) can write: never into a
        # directory of the daemon user's.
        directory = Dir.open(into, trusted={0, os.geteuid()}, create=True)
    except UnsafePath as exc:
        return _fail(str(exc), as_json, EX_CANTCREAT)
    except OSError as exc:
        return _fail(f"cannot write in {into}: {_reason(exc)}", as_json, EX_CANTCREAT)
    with directory:
        if directory.created:
            print(f"pairctl: made {into} (mode 0700) for the bundles", flush=True)
        return anyio.run(_take, directory, sockets, as_json)


async def _take(into: Dir, sockets: dict[str, str], as_json: bool) -> int:
    staging = bundle.staging_dir(into)
    try:
        snapshots: dict[str, BackupResult] = {}
        files: list[bundle.BundleFile] = []
        for daemon in ("gateway", "assistant"):
            snapshots[daemon], collected = await _snapshot(daemon, sockets[daemon], staging)
            files += collected
            failpoint(f"pairctl.backup_collected_{daemon}")
        await anyio.to_thread.run_sync(bundle.write_manifest, staging, snapshots, files)
    except (OSError, UnsafePath, bundle.BundleError) as exc:
        into.remove_tree(staging.path.name)
        return _fail(_unwritten(into.path, exc), as_json, EX_CANTCREAT)
    except BaseException:
        into.remove_tree(staging.path.name)
        raise
    finally:
        staging.close()
    return await anyio.to_thread.run_sync(_check_and_name, into, staging, snapshots, as_json)


async def _snapshot(
    daemon: str, address: str, staging: Dir
) -> tuple[BackupResult, list[bundle.BundleFile]]:
    """The daemon's snapshot, copied into `staging` from its own backup/ only."""
    async with Client(address, timeout=BACKUP_TIMEOUT) as client:
        answer = await client.call("backup")
        peer = client.peer_uid()
    check_owner(peer, f"the {daemon} on {address}, which runs as that user")
    snapshot = bundle.snapshot_of(answer, daemon)
    with bundle.open_snapshot_dir(snapshot, peer, trusted_owners()) as source:
        files = await anyio.to_thread.run_sync(bundle.collect, snapshot, source, staging, peer)
    return snapshot, files


def _check_and_name(
    into: Dir, staging: Dir, snapshots: dict[str, BackupResult], as_json: bool
) -> int:
    _, checks = verify(staging.path, named=False)
    good = all(check.ok for check in checks)
    final = bundle.seal(into, staging, good=good)
    if as_json:
        results = [{"ok": c.ok, "check": c.line} for c in checks]
        print(render.as_json({"bundle": str(final), "verified": good, "checks": results}))
        return 0 if good else EX_HANDLER
    _print_checks(checks)
    if not good:
        print(f"FAILED verification: kept as {final} for a look; it is not a bundle")
        return EX_HANDLER
    gateway = snapshots["gateway"].high_water
    events = snapshots["assistant"].high_water.get("events")
    print(f"saved and verified bundle {final} (gateway outbox seq {gateway.get('outboxSeq')},"
          f" {gateway.get('outboxPending')} pending; assistant {events} events)")  # fmt: skip
    return 0


def check(path: Path, as_json: bool) -> int:
    """`backup --verify`: every check, printed; 0 when all pass."""
    path = path.absolute()
    if not path.is_dir():
        return _fail(f"{path} is not a bundle directory", as_json, EX_NOINPUT)
    manifest, checks = verify(path)
    good = all(check.ok for check in checks)
    if as_json:
        results = [{"ok": c.ok, "check": c.line} for c in checks]
        print(render.as_json({"bundle": str(path), "verified": good, "checks": results,
                              "manifest": msgspec.to_builtins(manifest)}))  # fmt: skip
    else:
        _print_checks(checks)
        print(f"{path}: {'verified' if good else 'FAILED verification'}")
    return 0 if good else EX_HANDLER


def listing(into: Path, as_json: bool) -> int:
    """`backup --list`: the bundles in a directory; one cut short, failed or damaged is
    never listed as a bundle, one that cannot be read says so."""
    into = into.absolute()
    try:
        with Dir.open(into) as directory:
            found = list(bundle.bundles(directory))
    except (OSError, UnsafePath) as exc:
        return _fail(f"cannot list {into}: {_reason(exc)}", as_json, EX_NOINPUT)
    if as_json:
        entries = [
            {"bundle": str(path), "whole": state.startswith("bundle"), "state": state}
            for path, state in found
        ]
        print(render.as_json(entries))
    else:
        for path, state in found:
            print(render.escaped(f"{path}  {state}"))
    return 0


def restore_bundle(
    path: Path, state_dir: Path, sockets: dict[str, str], as_json: bool, *, named: bool
) -> int:
    """`restore`: refused while a daemon runs (its lock or its socket); checked as copied;
    then swapped in, all or nothing. A state directory is made only when it was `named`
    (--state-dir, $PAIR_STATE_DIR), never a default's in the current directory."""
    path, state_dir = path.absolute(), state_dir.absolute()
    refusal = _refusal(path, state_dir, sockets, named=named)
    if refusal is not None:
        message, code, kind = refusal
        return _fail(message, as_json, code, kind)
    try:
        with Dir.open(state_dir, trusted=trusted_owners(), create=named) as state:
            checks, done = restore(path, state, lambda: _running(sockets))
    except Refused as refused:
        if not as_json:
            _print_checks(refused.checks)
        return _fail(f"{path} failed verification; nothing was restored", as_json, EX_HANDLER)
    except RestoreError as exc:
        return _fail(str(exc), as_json, EX_TEMPFAIL, "RESTORE_REFUSED")
    except bundle.BundleError as exc:
        return _fail(f"{exc}; nothing was restored", as_json, EX_HANDLER)
    except (OSError, UnsafePath) as exc:
        return _fail(f"cannot restore into {state_dir}: {_reason(exc)}", as_json, EX_CANTCREAT)
    if as_json:
        print(render.as_json({"bundle": str(path), "state": str(state_dir), "done": [done]}))
        return 0
    _print_checks(checks)
    print(render.escaped(done))
    print("start the pair (systemctl start pair-gateway.socket pair-assistant.socket, or"
          " make run); once it is right, `pairctl restore --finish` removes the replaced"
          " files")  # fmt: skip
    return 0


def _refusal(
    path: Path, state_dir: Path, sockets: dict[str, str], *, named: bool
) -> tuple[str, int, str] | None:
    """Why the restore cannot begin (message, exit code, errorCode), before any file."""
    running = _running(sockets)
    if running is not None:
        return (f"{running}: stop both daemons and their sockets first (systemctl stop"
                " pair-gateway.socket pair-gateway pair-assistant.socket pair-assistant,"
                " or stop `make run`)", EX_TEMPFAIL, "DAEMON_RUNNING")  # fmt: skip
    if not path.is_dir():
        return f"{path} is not a bundle directory", EX_NOINPUT, "NO_BUNDLE"
    if not named and not state_dir.is_dir():
        return (f"{state_dir} does not exist (the default state directory, from the"
                " current directory): name the pair's with --state-dir DIR", EX_NOINPUT,
                "NO_STATE_DIR")  # fmt: skip
    return None


def after_restore(state_dir: Path, *, finish: bool, as_json: bool) -> int:
    """`restore --resume` (finish a swap cut short) or `restore --finish` (remove the
    files the last restore replaced)."""
    try:
        with Dir.open(state_dir, trusted=trusted_owners()) as state:
            line = discard_kept(state) if finish else resume(state)
    except RestoreError as exc:
        return _fail(str(exc), as_json, EX_TEMPFAIL, "RESTORE_REFUSED")
    except (OSError, UnsafePath) as exc:
        return _fail(f"cannot change {state_dir}: {_reason(exc)}", as_json, EX_CANTCREAT)
    print(
        render.as_json({"state": str(state_dir), "done": line}) if as_json else render.escaped(line)
    )
    return 0


def _running(sockets: dict[str, str]) -> str | None:
    for daemon, address in sockets.items():
        if _answers(address):
            return f"the {daemon} answers on {Path(address).absolute()}"
    return None


def _answers(address: str) -> bool:
    """Whether something accepts connections on the socket (a systemd socket unit does,
    for its stopped daemon): a permission refusal counts, as nothing can be known."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(address)
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except OSError:
        return True
    finally:
        probe.close()
    return True


def _print_checks(checks: list[Check]) -> None:
    for item in checks:
        print(f"  {'ok  ' if item.ok else 'FAIL'}  {render.escaped(item.line)}")


def _unwritten(into: Path, exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left in {into} for the bundle; nothing was kept"
    return f"cannot write the bundle in {into}: {_reason(exc)}; nothing was kept"


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _fail(message: str, as_json: bool, code: int, kind: str | None = None) -> int:
    kinds = {EX_CANTCREAT: "CANNOT_WRITE", EX_TEMPFAIL: "DAEMON_RUNNING", EX_HANDLER: "BACKUP",
             EX_NOINPUT: "NO_BUNDLE"}  # fmt: skip
    return failed(message, kind or kinds[code], code, as_json)
