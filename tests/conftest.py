from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_report_header() -> list[str]:
    """What the suite tests, first, as apsw's own suite prints it."""
    import platform
    from importlib.metadata import version

    import apsw

    from pair import __version__

    return [
        f"pair {__version__}; Python {platform.python_version()}; SQLite"
        f" {apsw.sqlite_lib_version()} (apsw {apsw.apsw_version()}); uvloop {version('uvloop')};"
        f" anyio {version('anyio')}; msgspec {version('msgspec')}",
    ]


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
