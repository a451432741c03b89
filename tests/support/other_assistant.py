"""An assistant of another release, for the gateway's version-skew tests.

`python -m tests.support.other_assistant --runtime-dir D --state-dir S [--protocol 2-3]
[--without emit_events]` serves D/assistant.sock: `health`, `emit_event` and (unless
left out) `emit_events`, storing events in memory once per id, and `stored`, the ids
and payloads in the order they were stored.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import msgspec

from pair.protocol.dispatch import NoParams, Router
from pair.protocol.hello import ProtocolRange
from pair.runtime.daemon import DaemonConfig, main
from tests.support.stateless import Stateless


class Event(msgspec.Struct):
    id: str
    kind: str
    payload: dict[str, Any]


class Events(msgspec.Struct):
    events: list[Event]


class OtherAssistant(Stateless):
    def __init__(self, config: DaemonConfig, args: argparse.Namespace) -> None:
        low, _, high = args.protocol.partition("-")
        protocol = ProtocolRange(int(low), int(high or low))
        self.router = Router("assistantd", args.release, protocol)
        self.router.add("health", self.health, inline=True)
        self.router.add("emit_event", self.emit_event, inline=True)
        if "emit_events" not in args.without:
            self.router.add("emit_events", self.emit_events, inline=True)
        self.router.add("stored", self.stored, inline=True)
        self.events: list[Event] = []

    def health(self, params: NoParams) -> dict[str, Any]:
        return {"status": "ok", "pid": os.getpid()}

    def emit_event(self, params: Event) -> dict[str, bool]:
        duplicate = any(event.id == params.id for event in self.events)
        if not duplicate:
            self.events.append(params)
        return {"stored": not duplicate}

    def emit_events(self, params: Events) -> dict[str, Any]:
        stored = [self.emit_event(event)["stored"] for event in params.events]
        return {"accepted": sum(stored), "duplicates": []}

    def stored(self, params: NoParams) -> list[Event]:
        return self.events

    def status(self) -> str:
        return "another release's assistant"


def flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", default="1")
    parser.add_argument("--release", default="9.9.9")
    parser.add_argument("--without", action="append", default=[])


if __name__ == "__main__":
    sys.exit(main("assistant", "an assistant of another release", OtherAssistant, flags))
