"""Read tar+gzip streams strictly: one gzip member under a budget, only files, dirs, small PAX.

The mechanics under the package extractor: tarfile splits blocks, everything else (links,
GNU long names, sparse maps, its PAX parser) is replaced by refusals and a linear PAX parser.
"""

from __future__ import annotations

import errno
import tarfile
import zlib
from collections.abc import Mapping
from typing import Self

from aisoc_plugind.delivery.limits import CHUNK, MIB, Deadline
from aisoc_plugind.errors import ArchiveError

__all__ = ["Gunzip", "StrictTarInfo", "show_name"]

PAX_HEADER_MAX = MIB


class Gunzip:
    """The decompressed bytes of exactly one gzip member, under a byte budget and deadline."""

    def __init__(self, data: bytes, *, budget: int, deadline: Deadline) -> None:
        self._src = memoryview(data)
        self._pos = 0
        self._inflater = zlib.decompressobj(wbits=31)  # gzip wrapper only, CRC checked
        self._budget = budget
        self._deadline = deadline
        self.total = 0

    def read(self, size: int = -1, /) -> bytes:
        size = size if size > 0 else CHUNK
        while not self._inflater.eof:
            self._deadline.left()
            feed = self._inflater.unconsumed_tail or self._next_input()
            out = self._inflater.decompress(feed, size)
            if out:
                return self._count(out)
            if not feed:
                raise ArchiveError("the gzip stream is truncated", code="archive_corrupt")
        if self._inflater.unused_data or self._pos < len(self._src):
            raise ArchiveError("data follows the gzip stream", code="archive_corrupt")
        return b""

    def _next_input(self) -> bytes:
        chunk = bytes(self._src[self._pos : self._pos + CHUNK])
        self._pos += len(chunk)
        return chunk

    def _count(self, out: bytes) -> bytes:
        self.total += len(out)
        if self.total > self._budget:
            raise ArchiveError(
                f"the package decompresses to more than {self._budget} bytes",
                code="archive_too_large",
            )
        return out

    def tell(self) -> int:
        return self.total

    def write(self, data: bytes, /) -> int:
        raise OSError(errno.EBADF, "read-only stream")

    def seek(self, pos: int, /) -> int:
        raise OSError(errno.ESPIPE, "not seekable")

    def close(self) -> None:
        self._src.release()


_LINK_TYPES = {
    tarfile.SYMTYPE: "a symlink",
    tarfile.LNKTYPE: "a hardlink",
    tarfile.GNUTYPE_LONGLINK: "a GNU long-link header",
}


_SPECIAL_TYPES = {
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a GNU sparse file",
    tarfile.GNUTYPE_LONGNAME: "a GNU long-name header",
    tarfile.XGLTYPE: "a PAX global header",
    tarfile.SOLARIS_XHDTYPE: "a Solaris extended header",
}


_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)


class StrictTarInfo(tarfile.TarInfo):
    """A TarInfo whose header processing admits only files, dirs and small PAX headers.

    tarfile documents `_proc_member` as the hook for subclasses; this one replaces all of
    tarfile's special-member handling (links, GNU long names, sparse maps, its PAX parser)
    with refusals and a linear PAX parser, so tarfile only splits blocks.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> Self:
        buf = tar.fileobj.read(tarfile.BLOCKSIZE)
        try:
            info = cls.frombuf(buf, tar.encoding, tar.errors)
        except tarfile.HeaderError as exc:
            if len(buf) == tarfile.BLOCKSIZE and not buf.strip(b"\0"):
                raise  # a zero block: the end-of-archive marker, tarfile's EOFHeaderError
            # tarfile would end the archive quietly at a bad header; that hides truncation.
            raise ArchiveError(f"bad tar header: {exc}", code="archive_corrupt") from exc
        info.offset = tar.fileobj.tell() - tarfile.BLOCKSIZE
        return info._proc_member(tar)

    def _proc_member(self, tar: tarfile.TarFile) -> Self:
        _check_type(self)
        if self.type == tarfile.XHDTYPE:
            return self._proc_strict_pax(tar)
        return self._proc_plain(tar)

    def _proc_plain(self, tar: tarfile.TarFile) -> Self:
        self.offset_data = tar.fileobj.tell()
        _locate_next(self, tar)
        return self

    def _proc_strict_pax(self, tar: tarfile.TarFile) -> Self:
        if not 0 <= self.size <= PAX_HEADER_MAX:
            raise ArchiveError(
                f"a PAX header of {self.size} bytes (limit {PAX_HEADER_MAX})",
                code="archive_too_large",
            )
        buf = tar.fileobj.read(_blocks(self.size))
        if len(buf) != _blocks(self.size):
            raise ArchiveError("the archive ends inside a PAX header", code="archive_corrupt")
        records = _pax_records(buf[: self.size])
        try:
            member = self.fromtarfile(tar)
        except tarfile.HeaderError as exc:  # only the end marker gets here unconverted
            raise ArchiveError("a PAX header describes no entry", code="archive_corrupt") from exc
        if member.type == tarfile.XHDTYPE:
            raise ArchiveError("two PAX headers in a row", code="archive_corrupt")
        _apply_pax(member, records)
        member.offset = self.offset
        _locate_next(member, tar)
        return member


def _blocks(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _check_type(info: tarfile.TarInfo) -> None:
    if info.type in _LINK_TYPES:
        target = f" (to {show_name(info.linkname)})" if info.linkname else ""
        raise ArchiveError(
            f"{show_name(info.name)} is {_LINK_TYPES[info.type]}{target}; links are refused",
            code="archive_link",
        )
    if info.type not in (*_FILE_TYPES, tarfile.DIRTYPE, tarfile.XHDTYPE):
        kind = _SPECIAL_TYPES.get(info.type, f"an entry of type {info.type!r}")
        raise ArchiveError(
            f"{show_name(info.name)} is {kind}; only regular files and directories are allowed",
            code="archive_special_file",
        )


def _locate_next(info: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
    """Set where the next header starts; refuse sizes tar readers disagree about."""
    if info.size < 0 or (info.isdir() and info.size != 0):
        raise ArchiveError(
            f"{show_name(info.name)} has an invalid size {info.size}", code="archive_corrupt"
        )
    tar.offset = info.offset_data + _blocks(info.size)


def _pax_records(buf: bytes) -> dict[str, bytes]:
    """Parse `"<len> <key>=<value>\\n"` records in one linear pass (CVE-2024-6232)."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(buf):
        space = buf.find(b" ", pos, pos + 21)
        length = int(buf[pos:space]) if space > pos and buf[pos:space].isdigit() else 0
        end = pos + length
        key, eq, value = buf[space + 1 : end - 1].partition(b"=")
        if (
            length <= space - pos + 1
            or end > len(buf)
            or buf[end - 1 : end] != b"\n"
            or not eq
            or not key
        ):
            raise ArchiveError("a malformed PAX record", code="archive_corrupt")
        name = key.decode("utf-8", "replace")
        if name in records:
            raise ArchiveError(f"PAX record {name!r} appears twice", code="archive_corrupt")
        records[name] = value
        pos = end
    return records


_UTF8_CHARSET = b"ISO-IR 10646 2000 UTF-8"


def _apply_pax(info: tarfile.TarInfo, records: Mapping[str, bytes]) -> None:
    for key, value in records.items():
        if key.startswith("GNU.sparse."):
            raise ArchiveError(
                f"{show_name(info.name)} is a GNU sparse file; only regular files "
                "and directories are allowed",
                code="archive_special_file",
            )
        if key == "hdrcharset" and value != _UTF8_CHARSET:
            raise ArchiveError("PAX hdrcharset other than UTF-8", code="archive_path_invalid")
        if key == "path":
            info.name = _pax_text(value).rstrip("/")
        elif key == "size":
            if not (value.isdigit() and len(value) <= 20):
                raise ArchiveError(
                    f"PAX size {value[:30]!r} is not a number", code="archive_corrupt"
                )
            info.size = int(value)


def _pax_text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArchiveError(
            f"a PAX path {value[:100]!r} is not UTF-8", code="archive_path_invalid"
        ) from exc


def show_name(name: str) -> str:
    """Return an archive member name quoted for a message, cut at 200 characters."""
    return repr(name if len(name) <= 200 else name[:200] + "...")
