"""Invite codes: six CSPRNG digits, stored only as a keyed hash.

New invites store `h1:` + HMAC-SHA256(gateway.key, code). Invites imported
from the assistant keep their legacy unkeyed SHA-256 as `sha256:` + hex, so
they stay redeemable until they expire without new invites being weakened:
a lookup tries both forms of the presented code.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from pair.runtime.errors import EX_CANTCREAT, EX_CONFIG, DbOpenError

CODE_DIGITS = 6
KEY_BYTES = 32
HMAC_PREFIX = "h1:"
LEGACY_PREFIX = "sha256:"


def new_code() -> str:
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


class CodeHasher:
    """Hashes codes under the gateway's secret key; the key never leaves this object."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "CodeHasher(<key hidden>)"

    def hash(self, code: str) -> str:
        digest = hmac.new(self._key, code.encode("ascii"), hashlib.sha256).hexdigest()
        return HMAC_PREFIX + digest

    def candidates(self, code: str) -> tuple[str, str]:
        """The stored forms `code` may have: keyed (new) and legacy."""
        return self.hash(code), legacy_hash(code)


def legacy_hash(code: str) -> str:
    return LEGACY_PREFIX + hashlib.sha256(code.encode("ascii")).hexdigest()


def load_or_create_key(path: str) -> bytes:
    """Read `gateway.key`, creating it (0600, 32 random bytes) on first start.

    Written to a temporary file and renamed, so a crash never leaves a short key.
    """
    if os.path.exists(path):
        return _read_key(path)
    key = secrets.token_bytes(KEY_BYTES)
    temporary = f"{path}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        raise DbOpenError(f"cannot create key file {path}: {exc}", EX_CANTCREAT) from exc
    return key


def _read_key(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            key = file.read()
    except OSError as exc:
        raise DbOpenError(f"cannot read key file {path}: {exc}", EX_CANTCREAT) from exc
    if len(key) != KEY_BYTES:
        raise DbOpenError(
            f"key file {path} holds {len(key)} bytes, expected {KEY_BYTES}; refusing to start "
            "(restore it from backup: without it no open invite can be redeemed)",
            EX_CONFIG,
        )
    return key
