"""The pairctl command line: parse, call the daemon, print, exit with the error kind's code.

Exit codes (pair.ctl.failures has them all): 0 ok; 1 the daemon answered an
error (its errorCode and message are printed), or an answer pairctl cannot read
(INCOMPATIBLE_ANSWER); 2 usage, or a path pairctl refuses to trust; 66 no such
bundle; 69 the daemon could not be reached; 73 an output cannot be written; 75 a
daemon or a restore in the way; 77 this user may not use the socket (FORBIDDEN).
Errors never print a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import anyio

from pair import DAEMONS
from pair.ctl import backup, explore, failures, render
from pair.ctl.failures import forbidden
from pair.ctl.metrics import exposition_text, write_textfile
from pair.ctl.trust import refuse_relative_as_root
from pair.ctl.up import run_up
from pair.protocol import trace
from pair.protocol.client import BatchCall, Client
from pair.protocol.errors import IpcHandlerError, IpcTransportError
from pair.runtime.errors import EX_CANTCREAT, EX_HANDLER, EX_NOPERM, EX_OK, EX_UNAVAILABLE
from pair.runtime.files import Dir, UnsafePath
from pair.runtime.paths import (
    client_runtime_dir,
    client_state_dir,
    default_runtime_dir,
    default_state_dir,
)

CALL_TIMEOUT = 30.0
# A batch is at most a frame (16 MiB by default) of calls.
BATCH_FILE_LIMIT = 64 << 20


Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class UsageError(Exception):
    """Bad arguments found after parsing (unreadable JSON, a missing file)."""


def build_parser() -> argparse.ArgumentParser:
    # --json is accepted before or after the command; SUPPRESS keeps a
    # subcommand's default from overriding a --json given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the raw result"
    )
    common.add_argument(
        "--trace",
        action="store_true",
        default=argparse.SUPPRESS,
        help="send the call under a new trace and print its id (journalctl TRACE_ID=...)",
    )
    parser = argparse.ArgumentParser(
        prog="pairctl", description="Run and drive the gateway / assistant pair."
    )
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    parser.add_argument(
        "--trace", action="store_true", help="print the trace id of the call (for journalctl)"
    )
    parser.add_argument("--runtime-dir", type=Path, help="directory of the sockets")
    parser.add_argument("--state-dir", type=Path, help="directory of the databases")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_ops(commands, common)
    _add_explore(commands, common)
    _add_backups(commands, common)
    _add_calls(commands, common)
    _add_invites(commands, common)
    _add_contacts(commands, common)
    return parser


def _add_ops(commands: Commands, common: argparse.ArgumentParser) -> None:
    """up, status, metrics."""
    up = commands.add_parser("up", parents=[common], help="run both daemons in the foreground")
    up.add_argument("--log-level", default="INFO")
    commands.add_parser("status", parents=[common], help="both daemons' health")
    metrics = commands.add_parser(
        "metrics", parents=[common], help="both daemons' metrics, in Prometheus' text format"
    )
    metrics.add_argument(
        "--textfile",
        type=Path,
        help="write them to this file atomically (node_exporter's textfile collector)",
    )


def _add_explore(commands: Commands, common: argparse.ArgumentParser) -> None:
    """methods, describe, sql."""
    methods = commands.add_parser(
        "methods", parents=[common], help="what each daemon can be called with (rpc.discover)"
    )
    methods.add_argument("daemon", nargs="?", choices=DAEMONS)
    describe = commands.add_parser(
        "describe", parents=[common], help="one method: its params and result"
    )
    describe.add_argument("daemon", choices=DAEMONS)
    describe.add_argument("method")
    sql = commands.add_parser(
        "sql", parents=[common], help="one SQL statement on assistant.db (db_proxy)"
    )
    sql.add_argument("sql")
    sql.add_argument("--write", action="store_true", help="run mode: a write (default: a query)")
    sql.add_argument(
        "--bind", action="append", default=[], metavar="NAME=VALUE",
        help="a named parameter (:NAME); VALUE as JSON when it reads as JSON, else text",
    )  # fmt: skip
    sql.add_argument("--max-rows", type=int)


def _add_backups(commands: Commands, common: argparse.ArgumentParser) -> None:
    """backup (and --verify, --list), restore (and --resume, --finish)."""
    backup = commands.add_parser(
        "backup",
        parents=[common],
        help="a verified bundle of both databases, taken while they serve, in DIR",
    )
    backup.add_argument("dir", type=Path, nargs="?", metavar="DIR")
    backup.add_argument("--verify", type=Path, metavar="BUNDLE", help="check a bundle; exit 0/1")
    backup.add_argument("--list", action="store_true", help="the bundles in DIR, whole or not")
    restore = commands.add_parser(
        "restore",
        parents=[common],
        help="put a bundle's databases in place (both daemons and sockets stopped)",
    )
    restore.add_argument("bundle", type=Path, nargs="?", metavar="BUNDLE")
    after = restore.add_mutually_exclusive_group()
    after.add_argument("--resume", action="store_true", help="finish a restore that was cut short")
    after.add_argument(
        "--finish", action="store_true", help="remove the files the last restore replaced"
    )


def _add_calls(commands: Commands, common: argparse.ArgumentParser) -> None:
    """call: any method, or a batch."""
    call = commands.add_parser("call", parents=[common], help="call any method")
    call.add_argument("daemon", choices=DAEMONS)
    call.add_argument("method", nargs="?")
    call.add_argument("params", nargs="?", help="params as JSON (object or array)")
    call.add_argument("--batch", type=Path, help="a JSON file holding an array of calls")
    call.add_argument("--timeout", type=float, default=CALL_TIMEOUT)


def _add_invites(commands: Commands, common: argparse.ArgumentParser) -> None:
    """invite create, redeem, revoke, list."""
    invite = commands.add_parser("invite", parents=[common], help="invites").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = invite.add_parser("create", parents=[common], help="create an invite")
    create.add_argument("--contact", required=True)
    create.add_argument("--channel", required=True)
    create.add_argument("--max-uses", type=int)
    create.add_argument("--ttl", type=int, help="seconds until it expires")
    create.add_argument("--note")
    redeem = invite.add_parser("redeem", parents=[common], help="redeem a code")
    redeem.add_argument("--channel", required=True)
    redeem.add_argument("--code", required=True)
    redeem.add_argument("--external-user-id")
    redeem.add_argument("--external-chat-id")
    revoke = invite.add_parser("revoke", parents=[common], help="revoke an invite")
    revoke.add_argument("id")
    listing = invite.add_parser("list", parents=[common], help="list invites")
    listing.add_argument("--status", choices=("active", "redeemed", "revoked", "expired"))
    listing.add_argument("--channel")
    listing.add_argument("--contact")


def _add_contacts(commands: Commands, common: argparse.ArgumentParser) -> None:
    """contact create, list, delete."""
    contact = commands.add_parser("contact", parents=[common], help="contacts").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    contact_create = contact.add_parser("create", parents=[common], help="create a contact")
    contact_create.add_argument("name")
    contact_create.add_argument("--role")
    contact.add_parser("list", parents=[common], help="list contacts")
    contact_delete = contact.add_parser("delete", parents=[common], help="delete a contact")
    contact_delete.add_argument("id")


def runtime_dir_of(args: argparse.Namespace) -> tuple[Path, str]:
    if args.runtime_dir is not None:
        return args.runtime_dir, "from --runtime-dir"
    found = client_runtime_dir()
    refuse_relative_as_root(found[0], "--runtime-dir", "PAIR_RUNTIME_DIR")
    return found


def state_dir_of(args: argparse.Namespace) -> tuple[Path, bool]:
    """The state directory, and whether the operator named it (flag or environment)."""
    if args.state_dir is not None:
        return args.state_dir, True
    found, why = client_state_dir()
    refuse_relative_as_root(found, "--state-dir", "PAIR_STATE_DIR")
    return found, why.startswith("from $")


def socket_of(args: argparse.Namespace, daemon: str) -> str:
    return str(runtime_dir_of(args)[0] / f"{daemon}.sock")


def drop_none(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


Request = tuple[str, str, Any, Callable[[Any], str]]


def request_of(args: argparse.Namespace) -> Request:
    """(daemon, method, params, human renderer) for a one-call command."""
    if args.command == "call":
        return args.daemon, args.method, parse_params(args.params), render.as_json
    if args.command == "sql":
        try:
            bind = explore.bind_of(args.bind)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        mode = "run" if args.write else "query"
        params = drop_none(sql=args.sql, mode=mode, bind=bind, maxRows=args.max_rows)
        return "assistant", "db_proxy", params, explore.sql_result
    if args.command == "contact":
        if args.action == "create":
            params = drop_none(displayName=args.name, role=args.role)
            return "gateway", "contacts_create", params, render.contact_created
        if args.action == "list":
            return "gateway", "contacts_list", {"limit": 500}, render.contact_list
        return "gateway", "contacts_delete", {"id": args.id}, render.deleted
    if args.action == "create":
        params = drop_none(
            contactId=args.contact,
            sourceChannel=args.channel,
            maxUses=args.max_uses,
            ttlSeconds=args.ttl,
            note=args.note,
        )
        return "gateway", "invites_create", params, render.invite_created
    if args.action == "redeem":
        params = drop_none(
            sourceChannel=args.channel,
            code=args.code,
            externalUserId=args.external_user_id,
            externalChatId=args.external_chat_id,
        )
        return "gateway", "invites_redeem", params, render.redemption
    if args.action == "revoke":
        return "gateway", "invites_revoke", {"id": args.id}, render.invite_revoked
    params = drop_none(status=args.status, sourceChannel=args.channel, contactId=args.contact)
    return "gateway", "invites_list", {**params, "limit": 500}, render.invite_list


def parse_params(text: str | None) -> Any:
    if text is None:
        return None
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"params are not valid JSON: {exc}") from exc
    if not isinstance(params, dict | list):
        raise UsageError("params must be a JSON object or array")
    return params


def read_batch(path: Path) -> list[BatchCall]:
    try:
        with Dir.open(path.absolute().parent) as directory:
            entries = json.loads(directory.read_small(path.name, BATCH_FILE_LIMIT))
    except (OSError, UnsafePath, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read batch file {path}: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise UsageError("a batch file holds a non-empty JSON array of calls")
    calls = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
            raise UsageError('each batch entry is {"method": ..., "params"?: ..., "notify"?: bool}')
        calls.append(BatchCall(entry["method"], entry.get("params"), bool(entry.get("notify"))))
    return calls


async def one_call(args: argparse.Namespace) -> int:
    daemon, method, params, human = request_of(args)
    async with Client(
        socket_of(args, daemon), timeout=getattr(args, "timeout", CALL_TIMEOUT)
    ) as client:
        if args.trace:
            params = await traced(client, daemon, params)
        result = await client.call(method, params)
    print(render.as_json(result) if args.json else human(result))
    return EX_OK


async def traced(client: Client, daemon: str, params: Any) -> dict[str, Any]:
    """`params` with `_meta` of a new trace, whose id goes to stderr before the call (so
    that a call that fails or hangs can be followed too), for a daemon that takes it."""
    if isinstance(params, list):
        raise UsageError("--trace needs params as a JSON object: an array cannot carry _meta")
    if params is not None and "_meta" in params:
        raise UsageError("--trace makes the call's _meta: leave it out of the params")
    hello = await client.call("pair.hello", {})
    if trace.CAPABILITY not in hello.get("capabilities", ()):
        raise UsageError(
            f"the {daemon} ({hello.get('version', '?')}) does not take trace context: its"
            " release is older than --trace; call it without"
        )
    span = trace.Span.new()
    print(f"trace {span.trace_id}: journalctl TRACE_ID={span.trace_id}", file=sys.stderr)
    return {**(params or {}), "_meta": span.meta()}


async def batch_call(args: argparse.Namespace) -> int:
    calls = read_batch(args.batch)
    async with Client(socket_of(args, args.daemon), timeout=args.timeout) as client:
        results = await client.batch(calls)
    printable = [
        {"error": {"errorCode": r.code, "message": r.message, "data": r.data}}
        if isinstance(r, IpcHandlerError)
        else {"result": r}
        for r in results
    ]
    print(render.as_json(printable))
    return EX_HANDLER if any(isinstance(r, IpcHandlerError) for r in results) else EX_OK


async def discover(args: argparse.Namespace) -> int:
    daemons = [args.daemon] if args.daemon else list(DAEMONS)
    documents = {}
    for daemon in daemons:
        async with Client(socket_of(args, daemon), timeout=CALL_TIMEOUT) as client:
            documents[daemon] = await client.call("rpc.discover")
    if args.command == "methods":
        print(render.as_json(documents) if args.json else explore.methods_table(documents))
        return EX_OK
    document = documents[args.daemon]
    found = explore.method_named(document, args.method)
    if not found:
        raise UsageError(
            f"{args.daemon} has no method {args.method!r}; `pairctl methods {args.daemon}`"
            " lists them"
        )
    method = json.loads(found)
    print(render.as_json(method) if args.json else explore.describe(document, method))
    return EX_OK


async def status(args: argparse.Namespace) -> int:
    healths: dict[str, Any] = {}
    for daemon in DAEMONS:
        path = socket_of(args, daemon)
        try:
            async with Client(path, timeout=2, connect_timeout=2) as client:
                healths[daemon] = await client.call("health")
        except (IpcTransportError, IpcHandlerError) as exc:
            refusal = forbidden(exc)
            state = "forbidden" if refusal else "down"
            healths[daemon] = {"status": state, "socket": path, "error": refusal or str(exc)}
    print(render.as_json(healths) if args.json else render.status_table(healths))
    states = {render.status_of(health) for health in healths.values()}
    if "down" in states and not args.json:
        where, why = runtime_dir_of(args)
        print(f"pairctl: looked in {where} ({why}); --runtime-dir DIR or"
              " PAIR_RUNTIME_DIR=DIR looks elsewhere", file=sys.stderr)  # fmt: skip
    if "forbidden" in states:
        return EX_NOPERM
    if "down" in states:
        return EX_UNAVAILABLE
    # Answered, but not ok (degraded: its writes fail; or a status a later release adds).
    return EX_OK if states == {"ok"} else EX_HANDLER


async def metrics(args: argparse.Namespace) -> int:
    """Exit 0 even when a daemon is down: that is `pair_up{daemon} 0`, for the scraper."""
    answers: dict[str, dict[str, Any] | None] = {}
    healths: dict[str, dict[str, Any]] = {}
    for daemon in DAEMONS:
        try:
            async with Client(socket_of(args, daemon), timeout=2, connect_timeout=2) as client:
                answers[daemon] = await client.call("metrics")
                healths[daemon] = await client.call("health")
        except (IpcTransportError, IpcHandlerError) as exc:
            print(f"pairctl: {daemon}: {render.escaped(str(exc))}", file=sys.stderr)
            answers.setdefault(daemon, None)
    if args.json:
        print(render.as_json(answers))
        return EX_OK
    text = exposition_text(answers, healths)
    if args.textfile is not None:
        try:
            write_textfile(args.textfile, text.encode())
        except (OSError, UnsafePath) as exc:
            reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            where = args.textfile.absolute()
            print(f"pairctl: cannot write {where}: {reason}", file=sys.stderr)
            return EX_CANTCREAT
    else:
        sys.stdout.write("".join(render.escaped(line) + "\n" for line in text.splitlines()))
    return EX_OK


def backups(args: argparse.Namespace) -> int:
    """The backup commands; only those that talk to the daemons look for their sockets."""
    as_json = bool(getattr(args, "json", False))
    if args.command == "restore":
        state, named = state_dir_of(args)
        if args.resume or args.finish:
            if args.bundle is not None:
                raise UsageError("restore --resume and --finish take no BUNDLE")
            return backup.after_restore(state, finish=args.finish, as_json=as_json)
        if args.bundle is None:
            raise UsageError("restore needs a BUNDLE (or --resume, or --finish)")
        return backup.restore_bundle(args.bundle, state, sockets_of(args), as_json, named=named)
    if args.verify is not None:
        return backup.check(args.verify, as_json)
    if args.dir is None:
        raise UsageError("backup needs a DIR (or --verify BUNDLE)")
    if args.list:
        return backup.listing(args.dir, as_json)
    return backup.take(args.dir, sockets_of(args), as_json)


def sockets_of(args: argparse.Namespace) -> dict[str, str]:
    return {daemon: socket_of(args, daemon) for daemon in ("gateway", "assistant")}


def dispatch(args: argparse.Namespace) -> int:
    one_call_commands = ("call", "sql", "contact", "invite")
    if args.trace and (args.command not in one_call_commands or getattr(args, "batch", None)):
        raise UsageError("--trace is for one call: call, sql, contact or invite")
    if args.command in ("backup", "restore"):
        return backups(args)
    if args.command == "up":
        runtime = args.runtime_dir or default_runtime_dir()
        state = args.state_dir or default_state_dir()
        return run_up(runtime, state, args.log_level)
    if args.command == "status":
        return anyio.run(status, args)
    if args.command == "metrics":
        return anyio.run(metrics, args)
    if args.command in ("methods", "describe"):
        return anyio.run(discover, args)
    if args.command == "call" and args.batch is not None:
        return anyio.run(batch_call, args)
    if args.command == "call" and args.method is None:
        raise UsageError("call needs a METHOD (or --batch FILE)")
    return anyio.run(one_call, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        return dispatch(args)
    except (UsageError, UnsafePath) as exc:
        return failures.usage(str(exc), as_json)
    except (IpcHandlerError, IpcTransportError) as exc:
        return failures.report(exc, as_json, wire=args.command == "call")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as coreutils do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
