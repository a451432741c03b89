"""Run inside the machine: connect, call `health`, close, again, until STOP_FILE exists.

Creates STOP_FILE.started after its first answer. Prints one JSON object of
counts: `ok`; `refused` (connect failed: ECONNREFUSED, ENOENT, EACCES); `reset`
(the connection dropped before the answer); `retried` (an error answer marked
retryable, such as SHUTTING_DOWN from a daemon that had just begun to drain: the
call is sent again, as PROTOCOL.md allows); `answered:CODE` for other errors; and
`first` of each kind but `ok`, with the time it happened. Stdlib only, written
from PROTOCOL.md: a caller that knows nothing of our client.
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


def call_health(path: str, call_id: int) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CALL_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as exc:
            raise ConnectionRefusedError(str(exc)) from exc
        body = json.dumps({"jsonrpc": "2.0", "id": call_id, "method": "health"}).encode()
        sock.sendall(struct.pack(">I", len(body)) + body)
        (length,) = struct.unpack(">I", receive(sock, 4))
        answer: dict[str, Any] = json.loads(receive(sock, length))
        return answer


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def main(path: str, stop_file: str) -> None:
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    call_id = 0
    while not os.path.exists(stop_file):
        call_id += 1
        try:
            answer = call_health(path, call_id)
        except ConnectionRefusedError as exc:
            kind, detail = "refused", str(exc)
        except (ConnectionResetError, BrokenPipeError, TimeoutError) as exc:
            kind, detail = "reset", repr(exc)
        else:
            error = answer.get("error")
            if error is None:
                counts["ok"] += 1
                if counts["ok"] == 1:
                    open(stop_file + ".started", "w").close()
                continue
            data = error["data"]
            retry = data.get("retryable")
            kind = "retried" if retry else f"answered:{data['errorCode']}"
            detail = f"{data['errorCode']}: {error['message']}"
        counts[kind] += 1
        first.setdefault(kind, f"{time.time():.3f} {detail}")
    print(json.dumps({"counts": counts, "first": first}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
