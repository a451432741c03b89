"""--log-format journal: records as journald's native protocol reads them."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pair.runtime.journal import MAX_MESSAGE_BYTES, JournalHandler


def parse(datagram: bytes) -> dict[str, str]:
    """journald's reading of a native datagram (systemd.io/JOURNAL_NATIVE_PROTOCOL)."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, sep, after = rest.partition(b"\n")
        assert sep, "every field ends with a newline"
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            rest = after
            continue
        (size,) = struct.unpack("<Q", after[:8])
        fields[line.decode()] = after[8 : 8 + size].decode()
        assert after[8 + size : 9 + size] == b"\n"
        rest = after[9 + size :]
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, logging.Logger]]:
    path = str(tmp_path / "journal.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)
    handler = JournalHandler("gatewayd", "gateway", path)
    logger = logging.getLogger("gateway.link")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield receiver, logger
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
        handler.close()
        receiver.close()


def test_a_warning_keeps_its_priority_and_fields(
    journal: tuple[socket.socket, logging.Logger],
) -> None:
    receiver, logger = journal
    logger.warning("assistant link down: %s", "refused")
    fields = parse(receiver.recv(65536))
    assert fields["MESSAGE"] == "assistant link down: refused"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "gatewayd"
    assert fields["PAIR_DAEMON"] == "gateway"
    assert fields["LOGGER"] == "gateway.link"
    assert fields["CODE_FUNC"] == "test_a_warning_keeps_its_priority_and_fields"


def test_a_traceback_is_one_entry_and_a_forged_field_stays_inside_the_message(
    journal: tuple[socket.socket, logging.Logger],
) -> None:
    receiver, logger = journal
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("call failed\nPRIORITY=0")
    fields = parse(receiver.recv(65536))
    assert fields["PRIORITY"] == "3"
    assert fields["MESSAGE"].startswith("call failed\nPRIORITY=0\nTraceback")
    assert fields["MESSAGE"].endswith("ValueError: boom")


def test_a_huge_message_is_cut_not_lost(journal: tuple[socket.socket, logging.Logger]) -> None:
    receiver, logger = journal
    logger.info("x" * (MAX_MESSAGE_BYTES + 1000))
    fields = parse(receiver.recv(2 * MAX_MESSAGE_BYTES))
    assert fields["MESSAGE"] == "x" * MAX_MESSAGE_BYTES + "... [1000 more bytes cut]"
