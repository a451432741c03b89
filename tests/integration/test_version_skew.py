"""The handshake and capability gating between releases, against real processes.

The gateway meets an assistant of another release: one whose protocol range misses its
own (refused: health says why and which side to upgrade, events wait), and one without
`emit_events` (events go one at a time, in order). The mixed-version test of real
releases is tests/skew.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pair import __version__
from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError
from pair.protocol.evolution import breaking_changes
from pair.testing import Pair
from pair.testing.daemons import DaemonProcess
from tests.support.waiting import eventually, gateway_health_reaches, outbox_drained

pytestmark = pytest.mark.anyio


async def test_both_daemons_say_who_they_are_and_what_they_can_do(pair: Pair) -> None:
    for socket, daemon, method in (
        (pair.assistant_socket, "assistantd", "emit_events"),
        (pair.gateway_socket, "gatewayd", "invites_redeem"),
    ):
        async with Client(socket) as client:
            hello = await client.call(
                "pair.hello",
                {"product": "pair", "version": "0.3.0", "protocol": {"min": 1, "max": 2},
                 "capabilities": ["x"], "aMemberOfALaterRelease": {"n": 1}},
            )  # fmt: skip
            assert hello["product"] == "pair"
            assert hello["daemon"] == daemon
            assert hello["version"] == __version__
            assert hello["protocol"] == {"min": 1, "max": 1}
            assert method in hello["capabilities"]
            assert "backup" in hello["capabilities"]
            assert await client.call("pair.hello") == hello


async def test_a_caller_of_another_protocol_is_told_what_this_daemon_speaks(pair: Pair) -> None:
    async with Client(pair.assistant_socket) as client:
        with pytest.raises(IpcHandlerError) as caught:
            await client.call("pair.hello", {"protocol": {"min": 2, "max": 3}})
        refused = caught.value
        assert (refused.code, refused.status_code) == ("PROTOCOL_UNSUPPORTED", 426)
        said = {key: refused.data[key] for key in ("daemon", "version", "protocol")}
        assert said == {
            "daemon": "assistantd", "version": __version__, "protocol": {"min": 1, "max": 1},
        }  # fmt: skip
        assert "speaks protocol 1; the caller speaks 2-3" in refused.message
        assert (await client.call("health"))["status"] == "ok"


@contextlib.contextmanager
def other_assistant(pair: Pair, *flags: str) -> Iterator[DaemonProcess]:
    """An assistant of another release on the pair's assistant socket."""
    with DaemonProcess(
        "tests.support.other_assistant", pair.runtime, pair.state, *flags, socket_name="assistant"
    ) as daemon:
        yield daemon


async def contact(pair: Pair, name: str) -> str:
    async with Client(pair.gateway_socket) as gw:
        return str((await gw.call("contacts_create", {"displayName": name}))["contact"]["id"])


async def test_an_assistant_outside_the_window_is_refused_and_health_says_why(
    short_tmp: Path,
) -> None:
    """The gateway speaks protocol 1; an assistant speaking 2-3 is refused on each connect:
    health says so and which side to upgrade, events wait (none set aside), and once a
    release of the window is back on the socket they are delivered."""
    pair = Pair(short_tmp)
    with pair.checked():
        with other_assistant(pair, "--protocol", "2-3", "--release", "1.0.0"):
            pair.gateway.start()
            await contact(pair, "waits")

            async def refused() -> bool:
                link = (await gateway_health(pair))["assistant"]
                return bool(link["state"] == "incompatible")

            await eventually(refused)
            health = await gateway_health(pair)
            assert health["assistant"]["lastError"] == (
                "assistantd 1.0.0 (protocol 2-3) speaks no protocol version this gateway does"
                " (1): upgrade the gateway (a release works with the one before and the one"
                " after it)"
            )
            assert health["outbox"]["pending"] == 1
            assert health["outbox"]["dead"] == 0
        pair.assistant.start()
        await gateway_health_reaches(pair.gateway_socket, outbox_drained)
        link = (await gateway_health(pair))["assistant"]
        assert link["state"] == "connected"
        assert link["version"] == __version__
        assert link["protocol"] == {"min": 1, "max": 1}
        assert "emit_events" in link["capabilities"]


async def test_an_assistant_without_emit_events_gets_the_events_one_at_a_time_in_order(
    short_tmp: Path,
) -> None:
    pair = Pair(short_tmp)
    with pair.checked():
        with other_assistant(pair, "--without", "emit_events") as older:
            pair.gateway.start()
            created = [await contact(pair, f"c{n}") for n in range(5)]
            await gateway_health_reaches(pair.gateway_socket, outbox_drained)
            async with Client(older.socket_path) as assistant:
                stored = await assistant.call("stored")
            link = (await gateway_health(pair))["assistant"]
            assert "emit_events" not in link["capabilities"]
            assert "emit_event" in link["capabilities"]
        assert [event["payload"]["contactId"] for event in stored] == created


async def gateway_health(pair: Pair) -> Any:
    async with Client(pair.gateway_socket) as gw:
        return await gw.call("health")


COMPAT = Path(__file__).resolve().parents[2] / "compat"


def last_release() -> Path:
    """The newest release in compat/ below this one."""
    ours = _version(__version__)
    older = [path for path in COMPAT.iterdir() if path.is_dir() and _version(path.name) < ours]
    return max(older, key=lambda path: _version(path.name))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


async def test_nothing_the_last_release_offered_is_broken(pair: Pair) -> None:
    """Methods, params and results only grow (`pair.protocol.evolution`): a caller or a
    reader written against the last release works against this one."""
    release = last_release()
    for daemon, socket in (("assistant", pair.assistant_socket), ("gateway", pair.gateway_socket)):
        async with Client(socket) as client:
            today = await client.call("rpc.discover")
        before = json.loads((release / f"{daemon}.json").read_text())
        assert breaking_changes(before, today) == [], f"{daemon} breaks {release.name}"
