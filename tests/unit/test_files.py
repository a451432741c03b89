"""pair.runtime.files against what another user can plant: links, FIFOs, `../` names, a
directory swapped after it was opened, another owner, a directory others can write."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from pair.runtime.files import Dir, UnsafePath, copy_hashed, replace_atomically

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text("root's\n")
    path.chmod(0o644)
    return path


@pytest.fixture
def work(tmp_path: Path) -> Dir:
    (tmp_path / "work").mkdir(mode=0o700)
    return Dir.open(tmp_path / "work")


@pytest.mark.parametrize("name", ["../victim", "/etc/passwd", "a/b", "..", ".", "", "x\0y"])
def test_a_name_of_more_than_one_component_is_refused_before_anything_is_touched(
    work: Dir, name: str
) -> None:
    with pytest.raises(UnsafePath, match="is not a file name"):
        work.create(name)
    with pytest.raises(UnsafePath, match="is not a file name"):
        work.open_regular(name)
    with pytest.raises(UnsafePath, match="is not a file name"):
        work.rename("x", name)
    assert work.names() == []


def test_create_never_writes_through_a_planted_link_and_makes_files_0600(
    work: Dir, victim: Path
) -> None:
    os.symlink(victim, work.path / "out")
    with pytest.raises(FileExistsError):
        work.create("out")
    assert victim.read_text() == "root's\n"
    old = os.umask(0)
    try:
        with work.create("fresh") as file:
            file.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((work.path / "fresh").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("plant", "kind"),
    [
        (lambda path, victim: os.symlink(victim, path), "a symbolic link"),
        (lambda path, victim: os.mkfifo(path), "a FIFO"),
        (lambda path, victim: os.mkdir(path), "a directory"),
        (lambda path, victim: os.symlink("/dev/zero", path), "a symbolic link"),
    ],
)
def test_only_a_regular_file_is_opened_and_a_fifo_is_refused_at_once(
    work: Dir, victim: Path, plant: object, kind: str
) -> None:
    assert callable(plant)
    plant(work.path / "in", victim)
    with pytest.raises(UnsafePath, match=f"{work.path / 'in'} is {kind}, not a regular file"):
        work.open_regular("in")


def test_a_file_of_another_owner_is_refused_when_an_owner_is_asked_for(work: Dir) -> None:
    (work.path / "mine").write_bytes(b"x")
    with pytest.raises(UnsafePath, match=r"belongs to .*uid 0.*, not uid 12345"):
        work.open_regular("mine", owner=12345)


def test_a_directory_swapped_after_it_was_opened_keeps_every_write_in_the_one_opened(
    tmp_path: Path, victim: Path
) -> None:
    """The review's staging race: the directory renamed away and a link put in its
    place; what is written next still lands in the directory first opened."""
    staging = tmp_path / "staging"
    staging.mkdir()
    opened = Dir.open(staging)
    staging.rename(tmp_path / "stolen")
    staging.mkdir(mode=0o777)
    os.symlink(victim, staging / "manifest.json")
    replace_atomically(opened, "manifest.json", b"{}")
    assert (tmp_path / "stolen" / "manifest.json").read_bytes() == b"{}"
    assert victim.read_text() == "root's\n"
    assert (staging / "manifest.json").is_symlink()


def test_open_refuses_a_link_as_the_directory_itself(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(UnsafePath, match="is a symbolic link, not a directory"):
        Dir.open(tmp_path / "link")


@needs_root
def test_a_directory_of_another_owner_or_others_can_write_is_refused_with_its_owner(
    tmp_path: Path,
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=rf"refusing {theirs}: it belongs to .*uid {NOBODY}"):
        Dir.open(theirs, trusted={0})
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafePath, match=rf"refusing {shared}: other users can write in it"):
        Dir.open(shared, trusted={0})
    shared.chmod(0o1777)
    with pytest.raises(UnsafePath, match="other users can write in it"):
        Dir.open(shared, trusted={0})
    (shared / "mine").mkdir(mode=0o700)
    with Dir.open(shared / "mine", trusted={0}) as mine:
        assert mine.names() == []
    (shared / "theirs").mkdir()
    os.chown(shared / "theirs", NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match="it belongs to"):
        Dir.open(shared / "theirs" / "below", trusted={0})


def test_create_makes_a_missing_last_directory_0700_and_says_so(tmp_path: Path) -> None:
    with Dir.open(tmp_path / "new", create=True) as made:
        assert made.created
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    with Dir.open(tmp_path / "new", create=True) as again:
        assert not again.created


def test_copy_hashed_reports_the_bytes_it_wrote_even_if_the_source_grows_after(
    work: Dir,
) -> None:
    (work.path / "src").write_bytes(b"a" * 3000)
    with work.open_regular("src") as source, work.create("dst") as target:
        size, digest = copy_hashed(source, target)
        with open(work.path / "src", "ab") as grow:
            grow.write(b"later")
    assert size == 3000
    assert (work.path / "dst").read_bytes() == b"a" * 3000
    assert len(digest) == 64


def test_replace_atomically_leaves_the_old_file_whole_until_the_new_one_is(
    work: Dir,
) -> None:
    replace_atomically(work, "key", b"old")
    seen: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append((work.path / "key").read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(200):
            replace_atomically(work, "key", b"new-" * 1000)
            replace_atomically(work, "key", b"old")
    finally:
        stop.set()
        reader.join()
    assert set(seen) <= {b"old", b"new-" * 1000}
    assert work.names() == ["key"]
