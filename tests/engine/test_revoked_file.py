"""Reading `trust.revoked_file`: a trust-carrying file, refused when unsafe, never followed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aisoc_plugind.engine.revoked_file import (
    MAX_REVOKED_FILE_BYTES,
    file_identity,
    read_revocations,
)
from aisoc_plugind.errors import RevocationFileError

KEY_LINE = b'keys = ["vector-signer"]\n'


def _file(tmp_path: Path, data: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "revoked.toml"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_a_missing_file_revokes_nothing(tmp_path: Path) -> None:
    assert read_revocations(tmp_path / "absent.toml") == read_revocations(_file(tmp_path, b""))


def test_a_good_file_is_read(tmp_path: Path) -> None:
    revoked = read_revocations(_file(tmp_path, KEY_LINE))
    assert "vector-signer" in revoked.keys


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_file_others_may_write_is_unsafe(tmp_path: Path, mode: int) -> None:
    with pytest.raises(RevocationFileError) as caught:
        read_revocations(_file(tmp_path, KEY_LINE, mode))
    assert caught.value.code == "revoked_file_unsafe"


def test_a_link_is_not_followed(tmp_path: Path) -> None:
    target = _file(tmp_path, KEY_LINE)
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    with pytest.raises(RevocationFileError) as caught:
        read_revocations(link)
    assert caught.value.code == "revoked_file_unsafe"


def test_a_fifo_never_hangs_the_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(RevocationFileError) as caught:
        read_revocations(fifo)
    assert caught.value.code == "revoked_file_unsafe"


def test_a_directory_cannot_be_read(tmp_path: Path) -> None:
    directory = tmp_path / "dir.toml"
    directory.mkdir(mode=0o700)
    with pytest.raises(RevocationFileError) as caught:
        read_revocations(directory)
    assert caught.value.code in {"revoked_file_unsafe", "revoked_file_unreadable"}


def test_a_file_over_the_cap_is_refused(tmp_path: Path) -> None:
    big = _file(tmp_path, b"#" * (MAX_REVOKED_FILE_BYTES + 1) + b"\n")
    with pytest.raises(RevocationFileError) as caught:
        read_revocations(big)
    assert caught.value.code == "revoked_file_unreadable"


@pytest.mark.parametrize("data", [b"keys = [", b"keys = 3\n", b'key = ["typo"]\n'])
def test_a_file_that_does_not_parse_names_itself(tmp_path: Path, data: bytes) -> None:
    path = _file(tmp_path, data)
    with pytest.raises(RevocationFileError) as caught:
        read_revocations(path)
    assert str(path) in caught.value.message


def test_the_identity_changes_with_the_file(tmp_path: Path) -> None:
    path = _file(tmp_path, KEY_LINE)
    before = file_identity(path)
    assert before is not None
    path.write_bytes(KEY_LINE + b"digests = []\n")
    assert file_identity(path) != before
    assert file_identity(tmp_path / "absent") is None
