"""Run inside the machine: a caller of both daemons, looping until STOP_FILE exists.

    caller.py RUNTIME_DIR CONTACT_ID STOP_FILE

Each round opens a connection to the gateway for `invites_create` and
`invites_redeem` (a new code each round), then one to the assistant for a
`db_proxy` query. Creates STOP_FILE.started after the first whole round and keeps
the count of whole rounds in STOP_FILE.rounds. Prints one JSON object: `counts` per
kind (`ok`, `refused`, `reset` for a connection lost with a call in flight,
`retried` for an error marked retryable and `resent` for a request the daemon never
read (it could not be written, or the connection was reset before any answer),
both sent again as PROTOCOL.md allows, `answered:CODE` for any other
error), `first` of each kind but `ok`, `outcomes` of the redemptions, and
`redeemed`, the invite ids whose redemption was answered `redeemed`. Stdlib only,
written from PROTOCOL.md.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from collections import Counter
from typing import Any

CALL_TIMEOUT = 30.0


class Refused(Exception):
    pass


class Reset(Exception):
    pass


class Unsent(Exception):
    """The connection was closed before the request was written: it never ran."""


class Caller:
    def __init__(self, runtime_dir: str) -> None:
        self.runtime_dir = runtime_dir
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}
        self.next_id = 0
        self.outcomes: Counter[str] = Counter()
        self.open: dict[str, socket.socket] = {}
        # A user of its own per round, new across runs: each redemption links a new one.
        self.run = f"u{time.time_ns()}"

    def note(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        self.first.setdefault(kind, f"{time.time():.3f} {detail}")

    def connect(self, daemon: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CALL_TIMEOUT)
        try:
            sock.connect(os.path.join(self.runtime_dir, f"{daemon}.sock"))
        except OSError as exc:
            sock.close()
            raise Refused(str(exc)) from exc
        return sock

    def call(self, sock: socket.socket, method: str, params: dict[str, Any]) -> Any:
        """The result, or None once an error was counted; retryable errors are resent."""
        while True:
            self.next_id += 1
            body = json.dumps(
                {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
            ).encode()
            try:
                sock.sendall(struct.pack(">I", len(body)) + body)
            except OSError as exc:
                raise Unsent(f"{method}: {exc!r}") from exc
            try:
                header = receive(sock, 4)
            except ConnectionResetError as exc:
                # AF_UNIX resets a peer only when its socket is closed with bytes still
                # unread: the daemon's drain closed it with this request unread.
                raise Unsent(f"{method}: {exc!r} before any answer") from exc
            except (OSError, Reset) as exc:
                raise Reset(f"{method}: {exc!r}") from exc
            try:
                (length,) = struct.unpack(">I", header)
                answer: dict[str, Any] = json.loads(receive(sock, length))
            except (OSError, Reset) as exc:
                raise Reset(f"{method}: {exc!r}") from exc
            error = answer.get("error")
            if error is None:
                self.counts["ok"] += 1
                return answer["result"]
            data = error.get("data") or {}
            if data.get("retryable"):
                self.note("retried", f"{method}: {data.get('errorCode')}")
                time.sleep(0.05)
                continue
            self.note(f"answered:{data.get('errorCode')}", f"{method}: {error['message']}")
            return None

    def round(self, contact_id: str, number: int, redeemed: list[str]) -> bool:
        self.open = {daemon: self.connect(daemon) for daemon in ("gateway", "assistant")}
        try:
            created = self.on(
                "gateway", "invites_create", {"contactId": contact_id, "sourceChannel": "tg"}
            )
            if created is None:
                return False
            params = {
                "sourceChannel": "tg",
                "code": created["code"],
                "externalUserId": f"{self.run}-{number}",
            }
            result = self.on("gateway", "invites_redeem", params)
            if result is None:
                return False
            self.outcomes[result["outcome"]] += 1
            if result["outcome"] == "redeemed":
                redeemed.append(created["invite"]["id"])
            rows = self.on("assistant", "db_proxy", {"sql": "SELECT 1 AS n", "mode": "query"})
            return rows is not None
        finally:
            for sock in self.open.values():
                sock.close()

    def on(self, daemon: str, method: str, params: dict[str, Any]) -> Any:
        """`call` on the round's connection to `daemon`. A daemon closes its idle
        connections when its drain ends (a restart): a request it never read never
        ran, and is sent again on a new connection."""
        while True:
            try:
                return self.call(self.open[daemon], method, params)
            except Unsent as exc:
                self.note("resent", str(exc))
                self.open[daemon].close()
                self.open[daemon] = self.connect(daemon)


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise Reset(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def main(runtime_dir: str, contact_id: str, stop_file: str) -> None:
    caller = Caller(runtime_dir)
    redeemed: list[str] = []
    number = rounds = 0
    while not os.path.exists(stop_file):
        number += 1
        try:
            whole = caller.round(contact_id, number, redeemed)
        except Refused as exc:
            caller.note("refused", str(exc))
        except Reset as exc:
            caller.note("reset", str(exc))
        else:
            if whole:
                rounds += 1
                with open(stop_file + ".rounds", "w") as file:
                    file.write(str(rounds))
                if rounds == 1:
                    open(stop_file + ".started", "w").close()
    report = {"counts": caller.counts, "outcomes": caller.outcomes, "first": caller.first}
    print(json.dumps({**report, "redeemed": redeemed}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
