"""A daemon with a few test routes, run as a real subprocess by the protocol tests.

`python -m tests.support.demo_server --runtime-dir D --state-dir S` serves D/demo.sock.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import anyio
import msgspec

from pair.protocol.dispatch import NoParams, Router
from pair.protocol.errors import RouteError
from pair.protocol.values import WireValue
from pair.runtime.daemon import DaemonConfig, main
from tests.support.stateless import Stateless


class EchoParams(msgspec.Struct, forbid_unknown_fields=True):
    value: WireValue = None
    text: str = ""


class SleepParams(msgspec.Struct, forbid_unknown_fields=True):
    seconds: float


class FailParams(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    status_code: int = 409
    error_code: str = "DEMO_CONFLICT"


class BuggyParams(msgspec.Struct, forbid_unknown_fields=True):
    """Params whose decoding hits a bug of ours (not a validation failure) when `bug` is set."""

    bug: bool = False

    def __post_init__(self) -> None:
        if self.bug:
            raise RuntimeError("a bug in a params type")


class DemoApp(Stateless):
    def __init__(self, config: DaemonConfig, args: argparse.Namespace) -> None:
        self.router = Router("demo", "0.1.0")
        self.router.add("echo", self.echo, inline=True)
        self.router.add("echo_async", self.echo_async)
        self.router.add("echo_thread", self.echo_thread, thread=True)
        self.router.add("sleep", self.sleep)
        self.router.add("spin", self.spin, inline=True)
        self.router.add("fail", self.fail, inline=True)
        self.router.add("boom", self.boom)
        self.router.add("pid", self.pid, inline=True)
        self.router.add("buggy", self.buggy, inline=True)
        self.calls = 0

    def echo(self, params: EchoParams) -> EchoParams:
        """Answer the params unchanged."""
        return params

    async def echo_async(self, params: EchoParams) -> EchoParams:
        await anyio.sleep(0)
        return params

    def echo_thread(self, params: EchoParams) -> EchoParams:
        return params

    async def sleep(self, params: SleepParams) -> float:
        await anyio.sleep(params.seconds)
        return params.seconds

    def spin(self, params: SleepParams) -> float:
        """Hold the loop, as a call answered on it that takes a while does."""
        ends = time.perf_counter() + params.seconds
        while time.perf_counter() < ends:
            pass
        return params.seconds

    def fail(self, params: FailParams) -> None:
        raise RouteError("demo failure", params.status_code, params.error_code, data={"x": 1})

    async def boom(self, params: NoParams) -> None:
        raise ZeroDivisionError("secret detail")

    def buggy(self, params: BuggyParams) -> bool:
        return params.bug

    def pid(self, params: NoParams) -> int:
        return os.getpid()

    def status(self) -> str:
        return "demo ready"


if __name__ == "__main__":
    sys.exit(main("demo", "protocol test daemon", DemoApp))
