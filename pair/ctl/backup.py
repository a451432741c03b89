"""pairctl backup, backup --verify, backup --list and restore (the bundle itself: `bundle`)."""

from __future__ import annotations

import errno
import shutil
import socket
from pathlib import Path
from typing import Any

import anyio
import msgspec

from pair.ctl import bundle, render
from pair.ctl.failures import EX_CANTCREAT, EX_HANDLER, EX_TEMPFAIL, failed
from pair.protocol.client import Client
from pair.runtime.failpoints import failpoint

# A snapshot's time grows with the database: minutes for gigabytes.
BACKUP_TIMEOUT = 3600.0


def take(into: Path, sockets: dict[str, str], as_json: bool) -> int:
    """A bundle in `into`: the gateway's snapshot, then the assistant's (`bundle`'s cut),
    sealed, then verified."""
    if not into.is_dir():
        return _fail(f"{into} is not a directory", as_json, EX_CANTCREAT)
    try:
        staging = bundle.staging_dir(into)
    except (OSError, bundle.BundleError) as exc:
        return _fail(f"cannot write in {into}: {_reason(exc)}", as_json, EX_CANTCREAT)
    return anyio.run(_take, into, staging, sockets, as_json)


async def _take(into: Path, staging: Path, sockets: dict[str, str], as_json: bool) -> int:
    try:
        answers: dict[str, Any] = {}
        files: list[bundle.BundleFile] = []
        for daemon in ("gateway", "assistant"):
            async with Client(sockets[daemon], timeout=BACKUP_TIMEOUT) as client:
                answers[daemon] = await client.call("backup")
            files += await anyio.to_thread.run_sync(bundle.collect, answers[daemon], staging)
            failpoint(f"pairctl.backup_collected_{daemon}")
        final = await anyio.to_thread.run_sync(bundle.seal, staging, answers, files)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            message = f"no space left in {into} for the bundle; nothing was kept"
        else:
            message = f"cannot write the bundle in {into}: {_reason(exc)}; nothing was kept"
        return _fail(message, as_json, EX_CANTCREAT)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest, checks = await anyio.to_thread.run_sync(bundle.verify, final)
    good = all(check.ok for check in checks)
    if as_json:
        print(render.as_json({"bundle": str(final), "verified": good,
                              "checks": [{"ok": c.ok, "check": c.line} for c in checks],
                              "manifest": msgspec.to_builtins(manifest)}))  # fmt: skip
    else:
        _print_checks(checks)
        gateway = answers["gateway"]["highWater"]
        events = answers["assistant"]["highWater"]["events"]
        state = "saved and verified" if good else "saved, but FAILED verification:"
        print(f"{state} bundle {final} (gateway outbox seq {gateway['outboxSeq']},"
              f" {gateway['outboxPending']} pending; assistant {events} events)")  # fmt: skip
    return 0 if good else EX_HANDLER


def check(path: Path, as_json: bool) -> int:
    """`backup --verify`: every check, printed; 0 when all pass."""
    if not path.is_dir():
        return _fail(f"{path} is not a bundle directory", as_json, EX_HANDLER)
    _, checks = bundle.verify(path)
    good = all(check.ok for check in checks)
    if as_json:
        results = [{"ok": c.ok, "check": c.line} for c in checks]
        print(render.as_json({"bundle": str(path), "verified": good, "checks": results}))
    else:
        _print_checks(checks)
        print(f"{path}: {'verified' if good else 'FAILED verification'}")
    return 0 if good else EX_HANDLER


def listing(into: Path, as_json: bool) -> int:
    """`backup --list`: the bundles in a directory; one cut short is never listed as good."""
    if not into.is_dir():
        return _fail(f"{into} is not a directory", as_json, EX_HANDLER)
    found = list(bundle.bundles(into))
    if as_json:
        print(render.as_json([{"bundle": str(path), "whole": whole} for path, whole in found]))
    else:
        for path, whole in found:
            print(f"{path}  {'bundle' if whole else 'INCOMPLETE: not a bundle (cut short)'}")
    return 0


def restore(path: Path, state: Path, sockets: dict[str, str], as_json: bool) -> int:
    """`restore`: refused while a daemon's socket answers; verified first; then each file
    swapped in by a rename."""
    for daemon, address in sockets.items():
        if _answers(address):
            return _fail(
                f"the {daemon} answers on {address}: stop both daemons and their sockets first"
                " (systemctl stop pair-gateway.socket pair-gateway pair-assistant.socket"
                " pair-assistant, or stop `make run`)",
                as_json,
                EX_TEMPFAIL,
            )
    if not path.is_dir():
        return _fail(f"{path} is not a bundle directory", as_json, EX_HANDLER)
    _, checks = bundle.verify(path)
    if not all(check.ok for check in checks):
        if not as_json:
            _print_checks(checks)
        return _fail(f"{path} failed verification; nothing was restored", as_json, EX_HANDLER)
    try:
        done = bundle.restore(path, state)
    except bundle.BundleError as exc:
        return _fail(str(exc), as_json, EX_HANDLER)
    except OSError as exc:
        return _fail(f"cannot restore into {state}: {_reason(exc)}", as_json, EX_CANTCREAT)
    if as_json:
        print(render.as_json({"bundle": str(path), "state": str(state), "done": done}))
    else:
        _print_checks(checks)
        for line in done:
            print(line)
        print("start the pair (systemctl start pair-gateway.socket pair-assistant.socket, or"
              " make run): each daemon removes the files kept aside once it has opened"
              " the restored database")  # fmt: skip
    return 0


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


def _print_checks(checks: list[bundle.Check]) -> None:
    for item in checks:
        print(f"  {'ok  ' if item.ok else 'FAIL'}  {item.line}")


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _fail(message: str, as_json: bool, code: int) -> int:
    kinds = {EX_CANTCREAT: "CANNOT_WRITE", EX_TEMPFAIL: "DAEMON_RUNNING", EX_HANDLER: "BACKUP"}
    return failed(message, kinds[code], code, as_json)
