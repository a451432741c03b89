"""The handshake, `pair.hello`: what a peer is and can do, told on every (re)connect.

The version-skew policy (README, "Upgrading one side at a time") in code:

- A release is the package version (`pair.protocol.__version__`) and the range
  of wire protocol versions it speaks (`PROTOCOL`). The wire protocol is
  PROTOCOL.md: framing, the JSON-RPC envelope, the error shape. It changes only
  when an old peer could not read a new one; each release speaks its own
  version and the one before, so a release works with the one before and the
  one after it, in either upgrade order.
- Within one protocol version methods evolve additively (params and results
  only gain optional members, enums only gain values) and features are used
  by name (`capabilities`), never inferred from a version number.
- A peer whose protocol range does not meet ours is refused: `pair.hello`
  answers PROTOCOL_UNSUPPORTED with both ranges, and a client reports it.

A daemon of release 0.1.0 has no `pair.hello`: it is protocol 1, and its
capabilities are its methods, read from `rpc.discover` (`peer_before_hello`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import Struct

PRODUCT = "pair"


class ProtocolRange(Struct):
    """The wire protocol versions a peer speaks, both ends included."""

    min: int
    max: int

    def meets(self, other: ProtocolRange) -> bool:
        return self.min <= other.max and other.min <= self.max

    def __str__(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}-{self.max}"


PROTOCOL = ProtocolRange(1, 1)


class HelloParams(Struct, rename="camel", kw_only=True):
    """Who calls: all optional, and members a later release adds are ignored (the one
    method whose params tolerate unknown members: it is how releases meet)."""

    product: str | None = None
    version: str | None = None
    protocol: ProtocolRange | None = None
    capabilities: list[str] = []


class Hello(Struct, rename="camel", kw_only=True):
    """Who answers: its product, daemon, release, protocol range and capabilities."""

    product: str
    daemon: str
    version: str
    protocol: ProtocolRange
    capabilities: list[str]


@dataclass(frozen=True, slots=True)
class Peer:
    """What the other side said of itself on this connection."""

    daemon: str
    version: str
    protocol: ProtocolRange
    capabilities: frozenset[str]
    said_hello: bool

    def has(self, capability: str) -> bool:
        return capability in self.capabilities

    def __str__(self) -> str:
        return f"{self.daemon} {self.version} (protocol {self.protocol})"


def peer_of(hello: Any) -> Peer:
    """A peer from its `pair.hello` answer; members a later release adds are ignored."""
    answer = msgspec.convert(hello, Hello)
    return Peer(
        answer.daemon, answer.version, answer.protocol, frozenset(answer.capabilities), True
    )


def peer_refusing(data: Any) -> Peer:
    """The peer that answered PROTOCOL_UNSUPPORTED, from the error's `data`."""
    protocol = msgspec.convert(data.get("protocol"), ProtocolRange)
    daemon, version = str(data.get("daemon", "?")), str(data.get("version", "?"))
    return Peer(daemon, version, protocol, frozenset(), True)


def peer_before_hello(document: Any) -> Peer:
    """A peer of a release before `pair.hello` (0.1.0): protocol 1, its methods its
    capabilities, from its `rpc.discover` document."""
    info = document.get("info", {})
    methods = frozenset(method["name"] for method in document.get("methods", []))
    return Peer(
        str(info.get("title", "?")), str(info.get("version", "?")), ProtocolRange(1, 1),
        methods, False,
    )  # fmt: skip


def refusal(ours: ProtocolRange, peer: Peer, us: str) -> str | None:
    """Why `peer` cannot be talked to, or None: its protocol range misses ours."""
    if peer.protocol.meets(ours):
        return None
    upgrade = us if peer.protocol.min > ours.max else peer.daemon
    return (
        f"{peer} speaks no protocol version this {us} does ({ours}): upgrade the {upgrade}"
        " (a release works with the one before and the one after it)"
    )
