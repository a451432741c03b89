from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


def _short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pair-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: AF_UNIX socket paths are limited to 107 bytes."""
    yield from _short_tmp()


@pytest.fixture(scope="module")
def module_tmp() -> Iterator[Path]:
    """Like `short_tmp`, shared by a module's tests (for daemons that only refuse input)."""
    yield from _short_tmp()
