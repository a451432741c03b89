"""The handshake's terms: protocol ranges, a peer's answer read tolerantly and kept within
bounds, the refusal."""

from __future__ import annotations

import pytest

from pair.protocol.hello import (
    CAPABILITY_CHARS,
    MAX_CAPABILITIES,
    PEER_TEXT_CHARS,
    ProtocolRange,
    peer_before_hello,
    peer_of,
    peer_refusing,
    refusal,
    refused,
)


def test_ranges_meet_when_they_share_a_version() -> None:
    assert ProtocolRange(1, 2).meets(ProtocolRange(2, 3))
    assert not ProtocolRange(1, 1).meets(ProtocolRange(2, 3))
    assert str(ProtocolRange(2, 3)) == "2-3"
    assert str(ProtocolRange(1, 1)) == "1"


def test_a_later_releases_hello_is_read_and_its_new_members_ignored() -> None:
    peer = peer_of({
        "product": "pair", "daemon": "assistantd", "version": "0.9.0",
        "protocol": {"min": 1, "max": 3, "preferred": 2}, "capabilities": ["emit_events"],
        "region": "eu",
    })  # fmt: skip
    assert (peer.version, peer.protocol) == ("0.9.0", ProtocolRange(1, 3))
    assert peer.has("emit_events")
    assert not peer.has("emit_event")


def test_a_release_before_hello_is_protocol_1_with_its_methods_as_capabilities() -> None:
    peer = peer_before_hello(
        {"info": {"title": "assistantd", "version": "0.1.0"},
         "methods": [{"name": "emit_event"}, {"name": "emit_events"}]}
    )  # fmt: skip
    assert str(peer) == "assistantd 0.1.0 (protocol 1)"
    assert peer.has("emit_events")


def test_the_refusal_says_which_side_to_upgrade() -> None:
    older = peer_before_hello({"info": {"title": "assistantd", "version": "0.1.0"}})
    assert refusal(ProtocolRange(1, 2), older, "gateway") is None
    newer_only = peer_of({"product": "pair", "daemon": "assistantd", "version": "3.0.0",
                          "protocol": {"min": 3, "max": 4}, "capabilities": []})  # fmt: skip
    assert "upgrade the gateway" in str(refusal(ProtocolRange(1, 2), newer_only, "gateway"))
    assert "upgrade the assistantd" in str(refusal(ProtocolRange(2, 3), older, "gateway"))


def hello_with(**members: object) -> dict[str, object]:
    hello: dict[str, object] = {
        "product": "pair", "daemon": "assistantd", "version": "0.2.0",
        "protocol": {"min": 1, "max": 1}, "capabilities": ["emit_events"],
    }  # fmt: skip
    return {**hello, **members}


def test_a_million_capabilities_cost_a_bounded_set_of_names() -> None:
    """What a peer names is kept only up to a bound, and only when it is a name."""
    junk = ["x" * 10_000, "emit_event\x1b[2J", "db_proxy\nforged", ""]
    peer = peer_of(hello_with(capabilities=["emit_events", *junk, *map(str, range(10**6))]))
    assert len(peer.capabilities) <= MAX_CAPABILITIES
    assert peer.has("emit_events")
    assert not any(peer.has(name) for name in junk)
    assert all(len(name) <= CAPABILITY_CHARS for name in peer.capabilities)
    assert peer.dropped == 10**6 + len(junk) + 1 - len(peer.capabilities)


def test_a_peers_name_and_release_are_cut() -> None:
    peer = peer_of(hello_with(daemon="d" * 10**6, version="1." * 10**6))
    assert len(peer.daemon) <= PEER_TEXT_CHARS
    assert len(peer.version) <= PEER_TEXT_CHARS


def test_a_refusal_whose_range_meets_ours_is_still_a_refusal() -> None:
    """PROTOCOL_UNSUPPORTED is never a compatible peer: it said it would not talk to us."""
    liar = peer_refusing(
        {"daemon": "assistantd", "version": "0.2.0", "protocol": {"min": 1, "max": 1}}
    )
    assert refusal(ProtocolRange(1, 1), liar, "gateway") is None
    assert "answered PROTOCOL_UNSUPPORTED" in refused(ProtocolRange(1, 1), liar, "gateway")
    newer = peer_refusing({"protocol": {"min": 3, "max": 4}})
    assert "upgrade the gateway" in refused(ProtocolRange(1, 1), newer, "gateway")


@pytest.mark.parametrize(
    "said",
    [None, [], "x", {"methods": {"name": "emit_event"}}, {"info": [], "methods": []}],
    ids=repr,
)
def test_a_document_no_release_gives_is_a_value_error(said: object) -> None:
    with pytest.raises(ValueError, match="not an"):
        peer_before_hello(said)


@pytest.mark.parametrize("data", [None, [], {"protocol": "1"}, {}], ids=repr)
def test_refusal_data_no_release_gives_is_a_value_error(data: object) -> None:
    with pytest.raises(ValueError, match="object"):
        peer_refusing(data)


def test_methods_that_are_not_names_are_no_capabilities() -> None:
    peer = peer_before_hello(
        {"methods": [{"name": "emit_event"}, {"name": 7}, 7, {"name": "a\x1b"}]}
    )
    assert peer.capabilities == frozenset({"emit_event"})
    assert peer.dropped == 3
