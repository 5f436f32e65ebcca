"""The safe-file helpers: no link followed, only regular files, caps, exclusive + atomic writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aisoc_plugind.files import FileRefused, read_regular, replace_file, write_new


def test_read_regular_reads_a_whole_file(tmp_path: Path) -> None:
    """A regular file under the cap is returned whole."""
    (tmp_path / "f").write_bytes(b"x" * 100)
    assert read_regular(tmp_path / "f", cap=100) == b"x" * 100


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.symlink_to("/etc/passwd"), "symlink"),
        (lambda p: os.mkfifo(p), "not_regular"),
        (lambda p: p.mkdir(), "not_regular"),
        (lambda p: p.write_bytes(b"x" * 101), "too_large"),
    ],
)
def test_read_regular_refuses(tmp_path: Path, make: object, reason: str) -> None:
    """Links, FIFOs (without hanging), directories and files over the cap are refused."""
    target = tmp_path / "f"
    make(target)  # type: ignore[operator]
    with pytest.raises(FileRefused) as info:
        read_regular(target, cap=100)
    assert info.value.reason == reason


def test_read_regular_head_returns_the_first_bytes(tmp_path: Path) -> None:
    """With head=True a larger file gives its first `cap` bytes instead of a refusal."""
    (tmp_path / "f").write_bytes(b"abcdef" * 1000)
    assert read_regular(tmp_path / "f", cap=4, head=True) == b"abcd"


def test_read_regular_relative_to_a_directory_descriptor(tmp_path: Path) -> None:
    """`dir_fd` resolves the name inside that directory."""
    (tmp_path / "f").write_bytes(b"ok")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read_regular("f", cap=10, dir_fd=fd) == b"ok"
    finally:
        os.close(fd)


def test_write_new_sets_the_exact_mode_and_never_overwrites(tmp_path: Path) -> None:
    """The umask does not decide the mode; an existing file or link is never replaced."""
    old = os.umask(0)
    try:
        write_new(tmp_path / "k", b"secret", 0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_new(tmp_path / "k", b"other", 0o600)
    (tmp_path / "l").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        write_new(tmp_path / "l", b"x", 0o600)
    assert not (tmp_path / "elsewhere").exists()


def test_replace_file_is_atomic_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    """The file is replaced whole with the given mode; nothing else stays in the directory."""
    path = tmp_path / "t"
    path.write_bytes(b"old")
    replace_file(path, b"new", mode=0o640, sync_dir=True)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
