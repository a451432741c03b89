"""Invite codes: six CSPRNG digits, stored only as a keyed hash.

New invites store `h1:` + HMAC-SHA256(gateway.key, code). Invites imported
from the assistant keep their legacy unkeyed SHA-256 as `sha256:` + hex, so
they stay redeemable until they expire without new invites being weakened:
a lookup tries both forms of the presented code.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from pathlib import Path

from pair.runtime.errors import EX_CANTCREAT, EX_CONFIG, DbOpenError
from pair.runtime.files import Dir, UnsafePath, replace_atomically
from pair.runtime.sqlite import Conn

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


def keyed_invite_count(conn: Conn) -> int:
    """How many invites hold a code hashed with the key (`h1:`), up to the first few."""
    rows = conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM ingress_invites"
        " WHERE invite_code_hash >= ? AND invite_code_hash < ? LIMIT 1000)",
        (HMAC_PREFIX, HMAC_PREFIX[:-1] + chr(ord(HMAC_PREFIX[-1]) + 1)),
    )
    return int(rows[0][0])


def load_or_create_key(path: str, keyed_invites: Callable[[], int]) -> bytes:
    """Read `gateway.key`, creating it (0600, 32 random bytes) on first start: written
    whole under a temporary name, renamed, and the directory fsynced, so neither a crash
    nor a power cut leaves a short key or loses a key invites were hashed with.

    Never minted beside a database whose invites were hashed with a key (`keyed_invites`
    counts them): a new key would silently kill every one of their codes.
    """
    where = Path(path)
    try:
        with Dir.open(where.parent) as directory:
            if directory.lstat(where.name) is not None:
                return _read_key(directory, where)
            keyed = keyed_invites()
            if keyed:
                raise DbOpenError(
                    f"key file {path} is missing, but the database holds {keyed} invite(s)"
                    " whose codes were hashed with it; refusing to make a new key (none of"
                    " them would redeem): put back the gateway.key that goes with this"
                    " database (a backup bundle holds both)",
                    EX_CONFIG,
                )
            key = secrets.token_bytes(KEY_BYTES)
            replace_atomically(directory, where.name, key)
    except (OSError, UnsafePath) as exc:
        raise DbOpenError(f"cannot create key file {path}: {exc}", EX_CANTCREAT) from exc
    return key


def _read_key(directory: Dir, where: Path) -> bytes:
    try:
        with directory.open_regular(where.name) as file:
            key = file.read(KEY_BYTES + 1)
    except (OSError, UnsafePath) as exc:
        raise DbOpenError(f"cannot read key file {where}: {exc}", EX_CANTCREAT) from exc
    if len(key) != KEY_BYTES:
        raise DbOpenError(
            f"key file {where} holds {len(key) if len(key) <= KEY_BYTES else 'more than 32'}"
            f" bytes, expected {KEY_BYTES}; refusing to start "
            "(restore it from backup: without it no open invite can be redeemed)",
            EX_CONFIG,
        )
    return key
