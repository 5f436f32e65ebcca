"""Package extraction: a malicious-tar corpus (research item 35) and the happy path."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from aisoc_plugind.delivery.limits import Limits
from aisoc_plugind.delivery.package import extract_package, member_path
from aisoc_plugind.errors import ArchiveError, OciError

TOP = "demo.plugin"
MANIFEST = b'{"id": "demo.plugin", "name": "Demo", "version": "1.0.0", "plugin_type": "enricher"}\n'
CODE = b"class Plugin:\n    def run(self, payload, context):\n        return {}\n"
Member = tuple[tarfile.TarInfo, bytes | None]


# ---- archive builders --------------------------------------------------------------------


def f(
    name: str, data: bytes = b"x = 1\n", *, mode: int = 0o644, pax: dict[str, str] | None = None
) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    if pax:
        info.pax_headers = pax
    return info, data


def d(name: str, *, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def base() -> list[Member]:
    return [d(TOP), f(f"{TOP}/plugin.yaml", MANIFEST), f(f"{TOP}/plugin.py", CODE)]


def tar_bytes(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buf.getvalue()


def tgz(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    return gzip.compress(tar_bytes(members, fmt), mtime=0)


def zeros_gz(size: int) -> bytes:
    """Gzip `size` zero bytes in 1 MiB steps (200 MB compresses to about 200 KB)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [comp.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + comp.flush()


def header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def smuggling_tar() -> bytes:
    """A PAX `size` that disagrees with the ustar size (CVE-2025-62518): the data blocks hold
    a symlink header that a reader trusting the ustar size would see as an entry."""
    payload = header(special(f"{TOP}/evil", tarfile.SYMTYPE, "/etc")[0]).ljust(1024, b"\0")
    record = f"size={len(payload)}\n"
    record = f"{len(record) + 3} {record}"  # the length counts itself: 2 digits and a space
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    file_info = tarfile.TarInfo(f"{TOP}/data.bin")  # ustar size 0
    body = header(pax) + record.encode().ljust(512, b"\0") + header(file_info) + payload
    return gzip.compress(tar_bytes(base())[: _entries_end(base())] + body + bytes(1024))


def _entries_end(members: list[Member]) -> int:
    """Byte length of the tar stream of `members` without its end-of-archive blocks."""
    raw = tar_bytes(members)
    end = len(raw)
    while end >= 512 and not raw[end - 512 : end].strip(b"\0"):
        end -= 512
    return end


def corrupt_second_header() -> bytes:
    raw = bytearray(tar_bytes([*base(), f(f"{TOP}/more.py")]))
    offset = _entries_end(base())  # header of more.py
    raw[offset + 148 : offset + 156] = b"0000000\0"  # a wrong checksum
    return gzip.compress(bytes(raw))


# ---- fixtures ----------------------------------------------------------------------------


@dataclass
class Place:
    """`staging` (empty, 0700) and a `sentinel` dir next to it that must stay untouched."""

    root: Path
    staging: Path
    sentinel: Path

    def snapshot(self) -> list[tuple[str, int, bytes | str]]:
        out: list[tuple[str, int, bytes | str]] = []
        for path in sorted(self.root.rglob("*")):
            if path.is_relative_to(self.staging):
                continue
            st = path.lstat()
            content: bytes | str = (
                os.readlink(path)
                if path.is_symlink()
                else path.read_bytes()
                if path.is_file()
                else b""
            )
            out.append((str(path.relative_to(self.root)), st.st_mode, content))
        return out


@pytest.fixture
def place(tmp_path: Path) -> Place:
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o700)
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("untouched\n")
    return Place(root=tmp_path, staging=staging, sentinel=sentinel)


# ---- happy path --------------------------------------------------------------------------


def test_package_extracts_contents_with_fixed_modes(place: Place) -> None:
    """Files land 0644 and dirs 0755 under staging, whatever the archive's modes."""
    members = [
        d(TOP, mode=0o777),
        f(f"{TOP}/plugin.yaml", MANIFEST, mode=0o4755),
        f(f"{TOP}/plugin.py", CODE, mode=0o777),
        d(f"{TOP}/lib", mode=0o2777),
        f(f"{TOP}/lib/helpers.py", b"X = 1\n", mode=0o6711),
        f(f"{TOP}/data/nested/empty.txt", b""),
    ]
    old_umask = os.umask(0o077)
    try:
        assert extract_package(tgz(members), place.staging).top == "demo.plugin"
    finally:
        os.umask(old_umask)
    s = place.staging
    assert (s / "plugin.yaml").read_bytes() == MANIFEST
    assert (s / "plugin.py").read_bytes() == CODE
    assert (s / "lib/helpers.py").read_bytes() == b"X = 1\n"
    assert (s / "data/nested/empty.txt").read_bytes() == b""
    for path in s.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert not path.is_symlink()
        assert mode == (0o755 if path.is_dir() else 0o644), path


def test_signed_package_layout_is_kept(place: Place) -> None:
    """plugin.sig and nested modules come out byte-identical."""
    members = [*base(), f(f"{TOP}/plugin.sig", b"ab" * 64), f(f"{TOP}/pkg/__init__.py", b"")]
    extract_package(tgz(members), place.staging)
    assert sorted(p.relative_to(place.staging).as_posix() for p in place.staging.rglob("*")) == [
        "pkg",
        "pkg/__init__.py",
        "plugin.py",
        "plugin.sig",
        "plugin.yaml",
    ]


def test_leading_dot_slash_names_are_normalised(place: Place) -> None:
    """`./top/x` archives (GNU tar's default) extract like `top/x`."""
    members = [(info, data) for info, data in base()]
    for info, _ in members:
        info.name = f"./{info.name}"
    extract_package(tgz(members), place.staging)
    assert (place.staging / "plugin.yaml").read_bytes() == MANIFEST


def test_pax_size_is_the_only_size_trusted(place: Place) -> None:
    """A PAX size that disagrees with ustar is honoured; the smuggled symlink stays data."""
    extract_package(smuggling_tar(), place.staging)
    data = (place.staging / "data.bin").read_bytes()
    assert data.startswith(f"{TOP}/evil".encode())
    assert not (place.staging / "evil").exists()


# ---- malicious corpus --------------------------------------------------------------------


def long_name() -> str:
    return f"{TOP}/" + "a" * 150 + ".py"


CASES: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "dotdot-traversal": (
        lambda s: tgz([*base(), f(f"{TOP}/../../sentinel/evil.py")]),
        "archive_path_traversal",
    ),
    "dotdot-as-top": (lambda s: tgz([f("../sentinel/evil.py"), *base()]), "archive_path_traversal"),
    "absolute-path": (
        lambda s: tgz([*base(), f(f"{s.parent}/sentinel/evil.py")]),
        "archive_absolute_path",
    ),
    "symlink-out": (
        lambda s: tgz([*base(), special(f"{TOP}/out", tarfile.SYMTYPE, f"{s.parent}/sentinel")]),
        "archive_link",
    ),
    "symlink-in": (
        lambda s: tgz([*base(), special(f"{TOP}/alias.py", tarfile.SYMTYPE, "plugin.py")]),
        "archive_link",
    ),
    "write-through-symlink": (
        lambda s: tgz(
            [
                *base(),
                special(f"{TOP}/out", tarfile.SYMTYPE, "../../sentinel"),
                f(f"{TOP}/out/keep.txt", b"pwned\n"),
            ]
        ),
        "archive_link",
    ),
    "hardlink-out": (
        lambda s: tgz(
            [*base(), special(f"{TOP}/hard", tarfile.LNKTYPE, f"{s.parent}/sentinel/keep.txt")]
        ),
        "archive_link",
    ),
    "hardlink-in": (
        lambda s: tgz([*base(), special(f"{TOP}/hard.py", tarfile.LNKTYPE, f"{TOP}/plugin.py")]),
        "archive_link",
    ),
    "gnu-longlink": (
        lambda s: tgz(
            [*base(), special(f"{TOP}/l", tarfile.SYMTYPE, "x" * 200)], tarfile.GNU_FORMAT
        ),
        "archive_link",
    ),
    "char-device": (
        lambda s: tgz([*base(), special(f"{TOP}/null", tarfile.CHRTYPE)]),
        "archive_special_file",
    ),
    "block-device": (
        lambda s: tgz([*base(), special(f"{TOP}/sda", tarfile.BLKTYPE)]),
        "archive_special_file",
    ),
    "fifo": (
        lambda s: tgz([*base(), special(f"{TOP}/pipe", tarfile.FIFOTYPE)]),
        "archive_special_file",
    ),
    "gnu-sparse": (
        lambda s: tgz(
            [*base(), special(f"{TOP}/sparse", tarfile.GNUTYPE_SPARSE)], tarfile.GNU_FORMAT
        ),
        "archive_special_file",
    ),
    "pax-sparse": (
        lambda s: tgz([*base(), f(f"{TOP}/s.py", pax={"GNU.sparse.major": "1"})]),
        "archive_special_file",
    ),
    "gnu-longname": (
        lambda s: tgz([*base(), f(long_name())], tarfile.GNU_FORMAT),
        "archive_special_file",
    ),
    "pax-global-header": (lambda s: _with_global_header(), "archive_special_file"),
    "duplicate-file": (
        lambda s: tgz([*base(), f(f"{TOP}/plugin.py", b"evil = 1\n")]),
        "archive_duplicate",
    ),
    "duplicate-after-normalising": (
        lambda s: tgz([*base(), f(f"{TOP}/./plugin.py")]),
        "archive_duplicate",
    ),
    "duplicate-dir": (
        lambda s: tgz([*base(), d(f"{TOP}/lib"), d(f"{TOP}/lib/")]),
        "archive_duplicate",
    ),
    "file-then-dir": (lambda s: tgz([*base(), f(f"{TOP}/plugin.py/x.py")]), "archive_duplicate"),
    "pax-path-traversal": (
        lambda s: tgz([*base(), f(f"{TOP}/ok.py", pax={"path": "../sentinel/x"})]),
        "archive_path_traversal",
    ),
    "pax-path-absolute": (
        lambda s: tgz([*base(), f(f"{TOP}/ok.py", pax={"path": f"{s.parent}/sentinel/x"})]),
        "archive_absolute_path",
    ),
    "nul-in-name": (
        lambda s: tgz([*base(), f(f"{TOP}/ok.py", pax={"path": f"{TOP}/a\0b"})]),
        "archive_path_invalid",
    ),
    "backslash": (lambda s: tgz([*base(), f(f"{TOP}/a\\..\\..\\x.py")]), "archive_path_invalid"),
    "newline-in-name": (lambda s: tgz([*base(), f(f"{TOP}/a\nb.py")]), "archive_path_invalid"),
    "non-nfc-name": (lambda s: tgz([*base(), f(f"{TOP}/cafe\u0301.py")]), "archive_path_invalid"),
    "empty-name": (
        lambda s: tgz([*base(), f(f"{TOP}/x.py", pax={"path": ""})]),
        "archive_path_invalid",
    ),
    "huge-pax-header": (
        lambda s: tgz([*base(), f(f"{TOP}/x.py", pax={"comment": "A" * (2 << 20)})]),
        "archive_too_large",
    ),
    "overlong-path": (
        lambda s: tgz([*base(), f(f"{TOP}/" + "p" * 600 + ".py")]),
        "archive_path_too_long",
    ),
    "deep-nesting": (
        lambda s: tgz([*base(), f(f"{TOP}/" + "d/" * 40 + "x.py")]),
        "archive_path_too_long",
    ),
    "two-top-dirs": (
        lambda s: tgz([*base(), d("other"), f("other/plugin.yaml", MANIFEST)]),
        "archive_layout",
    ),
    "top-level-file": (lambda s: tgz([f("plugin.yaml", MANIFEST)]), "archive_layout"),
    "top-not-an-id": (lambda s: tgz([d("-x"), f("-x/plugin.yaml", MANIFEST)]), "archive_layout"),
    "no-manifest": (lambda s: tgz([d(TOP), f(f"{TOP}/plugin.py", CODE)]), "archive_layout"),
    "manifest-is-a-dir": (lambda s: tgz([d(TOP), d(f"{TOP}/plugin.yaml")]), "archive_layout"),
    "empty-archive": (lambda s: tgz([]), "archive_layout"),
    "corrupt-deflate": (lambda s: _clobber(tgz(base()), 10), "archive_corrupt"),
    "corrupt-gzip-crc": (lambda s: _clobber(tgz(base()), -8), "archive_corrupt"),
    "truncated-gzip": (lambda s: tgz(base())[:-30], "archive_corrupt"),
    "gzip-trailing-data": (lambda s: tgz(base()) + b"garbage", "archive_corrupt"),
    "two-gzip-members": (lambda s: tgz(base()) + tgz(base()), "archive_corrupt"),
    "not-gzip": (lambda s: tar_bytes(base()), "archive_corrupt"),
    "not-an-archive": (lambda s: b"hello world", "archive_corrupt"),
    "bad-header-mid-archive": (lambda s: corrupt_second_header(), "archive_corrupt"),
    "data-after-end-marker": (
        lambda s: gzip.compress(tar_bytes(base()) + b"\x01" * 512),
        "archive_corrupt",
    ),
    "truncated-header": (
        lambda s: gzip.compress(tar_bytes(base())[: _entries_end(base()) - 600]),
        "archive_corrupt",
    ),
    "truncated-file-data": (
        lambda s: gzip.compress(tar_bytes(base())[: _entries_end(base()) - 100]),
        "archive_corrupt",
    ),
}


def _clobber(data: bytes, offset: int) -> bytes:
    """Overwrite 8 bytes: at 10 the first deflate block becomes BTYPE=11 (invalid); at -8
    the CRC32 trailer is wrong."""
    out = bytearray(data)
    out[offset : offset + 8 or None] = b"\xff" * 8
    return bytes(out)


def _with_global_header() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "../evil"}
    ) as tar:
        for info, data in base():
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return gzip.compress(buf.getvalue())


@pytest.mark.parametrize("case", sorted(CASES))
def test_malicious_archive_is_refused_and_nothing_escapes(place: Place, case: str) -> None:
    """Each corpus entry raises its ArchiveError code and leaves the sentinel untouched."""
    build, code = CASES[case]
    layer = build(place.staging)
    before = place.snapshot()
    with pytest.raises(ArchiveError) as caught:
        extract_package(layer, place.staging)
    assert caught.value.code == code, caught.value.message
    assert place.snapshot() == before
    assert (place.sentinel / "keep.txt").read_text() == "untouched\n"


def test_gzip_bomb_is_stopped_by_the_decompressed_budget(place: Place) -> None:
    """200 MB of zeros (~200 KB compressed) fails fast, having decompressed ≤ the budget."""
    layer = zeros_gz(200 << 20)
    assert len(layer) < 1 << 20
    started = time.monotonic()
    with pytest.raises(ArchiveError) as caught:
        extract_package(layer, place.staging)
    assert caught.value.code == "archive_too_large"
    assert time.monotonic() - started < 10
    assert list(place.staging.iterdir()) == []


def test_declared_huge_file_is_refused_before_writing(place: Place) -> None:
    """A member whose header claims 200 MB is refused on the header alone."""
    info = tarfile.TarInfo(f"{TOP}/big.bin")
    info.size = 200 << 20
    raw = tar_bytes(base())[: _entries_end(base())] + header(info)
    with pytest.raises(ArchiveError) as caught:
        extract_package(gzip.compress(raw), place.staging)
    assert caught.value.code == "archive_too_large"
    assert not (place.staging / "big.bin").exists()


def test_total_extracted_bytes_are_capped(place: Place) -> None:
    """Files that each fit but together exceed `extracted_bytes` are refused."""
    chunk = b"z" * (400 << 10)
    members = [*base()] + [f(f"{TOP}/blob{i}.bin", chunk) for i in range(3)]
    with pytest.raises(ArchiveError) as caught:
        extract_package(tgz(members), place.staging, limits=Limits(extracted_bytes=1 << 20))
    assert caught.value.code == "archive_too_large"
    written = sum(p.stat().st_size for p in place.staging.rglob("*") if p.is_file())
    assert written <= 1 << 20


def test_per_file_cap(place: Place) -> None:
    """One file over `file_bytes` is refused."""
    members = [*base(), f(f"{TOP}/big.bin", b"z" * 2048)]
    with pytest.raises(ArchiveError) as caught:
        extract_package(tgz(members), place.staging, limits=Limits(file_bytes=1024))
    assert caught.value.code == "archive_too_large"


def test_too_many_entries(place: Place) -> None:
    """More members than `entries` is refused."""
    members = [*base()] + [f(f"{TOP}/m{i}.py") for i in range(20)]
    with pytest.raises(ArchiveError) as caught:
        extract_package(tgz(members), place.staging, limits=Limits(entries=10))
    assert caught.value.code == "archive_too_many_entries"


def test_deadline(place: Place) -> None:
    """Extraction stops at the deadline."""
    with pytest.raises(ArchiveError) as caught:
        extract_package(tgz(base()), place.staging, limits=Limits(deadline_s=0))
    assert caught.value.code == "archive_timeout"


def test_preexisting_symlink_dir_in_staging_is_not_followed(place: Place) -> None:
    """A symlink already in staging is never written through (two-archive attack)."""
    (place.staging / "lib").symlink_to(place.sentinel)
    before = place.snapshot()
    with pytest.raises(OciError) as caught:
        extract_package(tgz([*base(), f(f"{TOP}/lib/keep.txt", b"pwned\n")]), place.staging)
    assert caught.value.code == "oci_staging_failed"
    assert place.snapshot() == before


def test_preexisting_symlink_file_in_staging_is_not_followed(place: Place) -> None:
    """O_EXCL|O_NOFOLLOW: a planted `plugin.py` link is not opened."""
    (place.staging / "plugin.py").symlink_to(place.sentinel / "keep.txt")
    with pytest.raises(OciError) as caught:
        extract_package(tgz(base()), place.staging)
    assert caught.value.code == "oci_staging_failed"
    assert (place.sentinel / "keep.txt").read_text() == "untouched\n"


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("a/b.py", ("a", "b.py")),
        ("./a//b/./c", ("a", "b", "c")),
        ("a/", ("a",)),
    ],
)
def test_member_path_normalises(name: str, parts: tuple[str, ...]) -> None:
    """Empty and `.` components go; the rest is kept in order."""
    assert member_path(name, Limits()) == parts


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("", "archive_path_invalid"),
        (".", "archive_path_invalid"),
        ("a/\x00", "archive_path_invalid"),
        ("a\\b", "archive_path_invalid"),
        ("a/\udcff", "archive_path_invalid"),
        ("/etc/passwd", "archive_absolute_path"),
        ("a/../../b", "archive_path_traversal"),
        ("..", "archive_path_traversal"),
        ("a/" * 33 + "b", "archive_path_too_long"),
        ("a" * 513, "archive_path_too_long"),
    ],
)
def test_member_path_refuses(name: str, code: str) -> None:
    """Each bad name shape has its own code."""
    with pytest.raises(ArchiveError) as caught:
        member_path(name, Limits())
    assert caught.value.code == code
