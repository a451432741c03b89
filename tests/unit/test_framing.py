from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pair.protocol.errors import FrameTooLarge, InvalidFrame
from pair.protocol.framing import HEADER, FrameDecoder


def encode_frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def test_several_frames_in_one_chunk_are_all_returned_in_order() -> None:
    decoder = FrameDecoder()
    chunk = encode_frame(b"a") + encode_frame(b"bc") + encode_frame(b"def")
    assert decoder.feed(chunk) == [b"a", b"bc", b"def"]
    assert not decoder.has_partial


def test_a_frame_split_inside_its_header_completes_later() -> None:
    decoder = FrameDecoder()
    frame = encode_frame(b"hello")
    assert decoder.feed(frame[:2]) == []
    assert decoder.has_partial
    assert decoder.feed(frame[2:7]) == []
    assert decoder.feed(frame[7:]) == [b"hello"]
    assert not decoder.has_partial


def test_zero_length_is_an_invalid_frame() -> None:
    with pytest.raises(InvalidFrame, match="frame length is 0"):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_a_length_over_the_limit_is_refused_before_any_body_arrives() -> None:
    decoder = FrameDecoder(max_frame_bytes=1024)
    with pytest.raises(FrameTooLarge, match="frame length 1025 exceeds the limit of 1024 bytes"):
        decoder.feed(struct.pack(">I", 1025))


def test_the_largest_length_is_refused_without_allocating() -> None:
    with pytest.raises(FrameTooLarge, match="4294967295"):
        FrameDecoder().feed(b"\xff\xff\xff\xff")


def test_a_frame_of_exactly_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame_bytes=8)
    assert decoder.feed(encode_frame(b"x" * 8)) == [b"x" * 8]


def test_eof_at_a_boundary_is_clean_and_mid_frame_is_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"ok"))
    decoder.check_eof()
    decoder.feed(encode_frame(b"partial")[:6])
    with pytest.raises(InvalidFrame, match=r"middle of a frame \(6 bytes buffered\)"):
        decoder.check_eof()


def test_a_large_frame_arriving_in_many_small_chunks() -> None:
    body = bytes(range(256)) * 4096
    frame = encode_frame(body)
    decoder = FrameDecoder()
    out: list[bytes] = []
    for start in range(0, len(frame), 999):
        out += decoder.feed(frame[start : start + 999])
    assert out == [body]


@given(
    bodies=st.lists(st.binary(min_size=1, max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_any_split_of_a_stream_yields_the_same_frames(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(body) for body in bodies)
    points = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    decoder = FrameDecoder()
    out: list[bytes] = []
    for start, end in itertools.pairwise(points):
        out += decoder.feed(stream[start:end])
    assert out == bodies
    decoder.check_eof()


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_yield_frames_or_a_frame_error_only(data: bytes) -> None:
    decoder = FrameDecoder(max_frame_bytes=512)
    try:
        frames = decoder.feed(data)
    except (InvalidFrame, FrameTooLarge):
        return
    assert all(1 <= len(frame) <= 512 for frame in frames)
