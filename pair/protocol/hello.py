"""The handshake, `pair.hello`: what a peer is and can do, told on every (re)connect.

The version-skew policy (README, "Upgrading one side at a time") in code:

- A release is the package version (`pair.__version__`) and the range
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

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import Struct

from pair.protocol.errors import ProtocolUnsupported

PRODUCT = "pair"

# What is kept of what a peer says of itself (it is held for the connection's life,
# reported by health and logged): a hostile or broken peer's million capabilities or
# megabyte release must cost neither memory nor a line of a megabyte.
PEER_TEXT_CHARS = 64
MAX_CAPABILITIES = 256
CAPABILITY_CHARS = 64
# A capability is a method's or a feature's name (`emit_events`, `pair.hello`); a string
# that is not one (control characters, spaces) can name nothing we use, and is dropped.
_CAPABILITY = re.compile(rf"[A-Za-z][A-Za-z0-9_.:-]{{0,{CAPABILITY_CHARS - 1}}}")


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
    # How many of the capabilities it named were not kept (past MAX_CAPABILITIES, or
    # not a name): worth a word in the log, never a reason to refuse it.
    dropped: int = 0

    def has(self, capability: str) -> bool:
        return capability in self.capabilities

    def __str__(self) -> str:
        return f"{self.daemon} {self.version} (protocol {self.protocol})"


def answer_hello(
    params: HelloParams,
    *,
    daemon: str,
    version: str,
    ours: ProtocolRange,
    capabilities: Iterable[str],
) -> Hello:
    """A daemon's answer to `pair.hello` (`Router` registers it on both daemons): who it
    is, or PROTOCOL_UNSUPPORTED (426) when the caller's range misses `ours`, with the
    daemon's name, release and range in `data`."""
    if params.protocol is not None and not params.protocol.meets(ours):
        raise ProtocolUnsupported(
            f"this {daemon} {version} speaks protocol {ours}; the caller speaks {params.protocol}",
            data={"daemon": daemon, "version": version, "protocol": msgspec.to_builtins(ours)},
        )
    return Hello(
        product=PRODUCT,
        daemon=daemon,
        version=version,
        protocol=ours,
        capabilities=sorted(capabilities),
    )


def peer_of(hello: Any) -> Peer:
    """A peer from its `pair.hello` answer; members a later release adds are ignored.
    Raises `ValueError` (msgspec's, with the path) on an answer no release gives."""
    answer = msgspec.convert(hello, Hello)
    capabilities, dropped = _capabilities(answer.capabilities)
    return Peer(_cut(answer.daemon), _cut(answer.version), answer.protocol, capabilities, dropped)


def peer_refusing(data: Any) -> Peer:
    """The peer that answered PROTOCOL_UNSUPPORTED, from the error's `data`; `ValueError`
    when `data` does not say its protocol range."""
    if not isinstance(data, dict):
        raise ValueError("the refusal's data is not an object")
    protocol = msgspec.convert(data.get("protocol"), ProtocolRange)
    daemon, version = _cut(data.get("daemon", "?")), _cut(data.get("version", "?"))
    return Peer(daemon, version, protocol, frozenset())


def peer_before_hello(document: Any) -> Peer:
    """A peer of a release before `pair.hello` (0.1.0): protocol 1, its methods its
    capabilities, from its `rpc.discover` document; `ValueError` when it is no such
    document."""
    if not isinstance(document, dict):
        raise ValueError("the document is not an object")
    info, methods = document.get("info", {}), document.get("methods", [])
    if not isinstance(info, dict) or not isinstance(methods, list):
        raise ValueError("its info is not an object or its methods not an array")
    names = (method.get("name") if isinstance(method, dict) else None for method in methods)
    capabilities, dropped = _capabilities(names)
    daemon, version = _cut(info.get("title", "?")), _cut(info.get("version", "?"))
    return Peer(daemon, version, ProtocolRange(1, 1), capabilities, dropped)


def _cut(text: object) -> str:
    return str(text)[:PEER_TEXT_CHARS]


def _capabilities(names: Iterable[object]) -> tuple[frozenset[str], int]:
    """The first MAX_CAPABILITIES names a peer gave that are names, and how many of all
    it gave were not kept."""
    kept: set[str] = set()
    seen = 0
    for name in names:
        seen += 1
        if len(kept) < MAX_CAPABILITIES and isinstance(name, str) and _CAPABILITY.fullmatch(name):
            kept.add(name)
    return frozenset(kept), seen - len(kept)


def refused(ours: ProtocolRange, peer: Peer, us: str) -> str:
    """Why a peer that answered PROTOCOL_UNSUPPORTED is not talked to. Never a compatible
    peer, even when the range it gives meets ours: it said it would not talk to us."""
    return refusal(ours, peer, us) or (
        f"{peer} answered PROTOCOL_UNSUPPORTED to this {us}'s protocol ({ours}), which its"
        " own range includes: a peer that refuses is not talked to"
    )


def refusal(ours: ProtocolRange, peer: Peer, us: str) -> str | None:
    """Why `peer` cannot be talked to, or None: its protocol range misses ours."""
    if peer.protocol.meets(ours):
        return None
    upgrade = us if peer.protocol.min > ours.max else peer.daemon
    return (
        f"{peer} speaks no protocol version this {us} does ({ours}): upgrade the {upgrade}"
        " (a release works with the one before and the one after it)"
    )
