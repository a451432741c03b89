"""The handshake's terms: protocol ranges, a peer's answer read tolerantly, the refusal."""

from __future__ import annotations

from pair.protocol.hello import (
    ProtocolRange,
    peer_before_hello,
    peer_of,
    refusal,
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
    assert (peer.version, peer.protocol, peer.said_hello) == ("0.9.0", ProtocolRange(1, 3), True)
    assert peer.has("emit_events")
    assert not peer.has("emit_event")


def test_a_release_before_hello_is_protocol_1_with_its_methods_as_capabilities() -> None:
    peer = peer_before_hello(
        {"info": {"title": "assistantd", "version": "0.1.0"},
         "methods": [{"name": "emit_event"}, {"name": "emit_events"}]}
    )  # fmt: skip
    assert str(peer) == "assistantd 0.1.0 (protocol 1)"
    assert peer.has("emit_events")
    assert not peer.said_hello


def test_the_refusal_says_which_side_to_upgrade() -> None:
    older = peer_before_hello({"info": {"title": "assistantd", "version": "0.1.0"}})
    assert refusal(ProtocolRange(1, 2), older, "gateway") is None
    newer_only = peer_of({"product": "pair", "daemon": "assistantd", "version": "3.0.0",
                          "protocol": {"min": 3, "max": 4}, "capabilities": []})  # fmt: skip
    assert "upgrade the gateway" in str(refusal(ProtocolRange(1, 2), newer_only, "gateway"))
    assert "upgrade the assistantd" in str(refusal(ProtocolRange(2, 3), older, "gateway"))
