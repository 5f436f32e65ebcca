"""The framed protocol between the supervisor and a plugin host, on one socketpair.

A frame is a 4-byte big-endian length of the rest, a 1-byte kind, a 4-byte big-endian length
of a JSON header, the header (UTF-8 JSON object), then an optional binary blob:

    | length: u32 | kind: u8 | header length: u32 | header JSON | blob |

Both sides cap what they accept (`FrameTooLarge` before anything is allocated): the host
accepts frames up to `MAX_TO_HOST` (a plugin's verified files), the supervisor up to what
`plugins.max_result_bytes` allows. The supervisor treats everything a host sends as
hostile: it parses only JSON, checks every field it uses, and never unpickles or unmarshals
anything from a host. Pure: no I/O beyond the stream it is handed.
"""

from __future__ import annotations

import asyncio
import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HEADER_CAP",
    "MAX_TO_HOST",
    "Frame",
    "FrameReader",
    "FrameTooLarge",
    "Kind",
    "ProtocolError",
    "encode",
    "read_frame",
]

_PREFIX = struct.Struct(">IBI")  # length of the rest, kind, header length
HEADER_CAP = 1024 * 1024  # JSON headers (payload and context of a run included)
MAX_TO_HOST = 256 * 1024 * 1024  # a plugin's files (bundle caps keep them far below)
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


class Kind(enum.IntEnum):
    """What a frame is."""

    # supervisor -> host
    LOAD = 1  # header: id, key, plugin_id, entry_point, root, config, files[[path, size]]; blob
    RUN = 2  # header: id, key, payload, context
    CANCEL = 3  # header: id (of the run to cancel)
    TEARDOWN = 4  # header: id, key
    STOP = 5  # header: {} (tear everything down, then exit 0)
    # host -> supervisor
    HELLO = 10  # header: pid, sandbox (the report)
    LOADED = 11  # header: id, key
    RESULT = 12  # header: id; blob: the result, a JSON object, UTF-8
    ERROR = 13  # header: id, code, message
    DONE = 14  # header: id (a teardown finished)


class ProtocolError(ValueError):
    """A frame that breaks the protocol (bad header, unknown kind): the peer is dropped."""


class FrameTooLarge(ProtocolError):
    """A frame (or a frame's header) over the cap; `size` says how large it was."""

    def __init__(self, message: str, *, size: int = 0) -> None:
        super().__init__(message)
        self.size = size


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    kind: Kind
    header: dict[str, Any]
    blob: bytes


def encode(kind: Kind, header: dict[str, Any], blob: bytes = b"") -> bytes:
    """Return one frame's bytes (raises ValueError for a header JSON cannot encode, and
    FrameTooLarge for a header over `HEADER_CAP`, which the peer would refuse)."""
    head = _ENCODE(header).encode("utf-8")
    if len(head) > HEADER_CAP:
        raise FrameTooLarge(
            f"a frame header of {len(head)} bytes, over the cap of {HEADER_CAP}", size=len(head)
        )
    return _PREFIX.pack(1 + 4 + len(head) + len(blob), kind, len(head)) + head + blob


_CHUNK = 1 << 16


class FrameReader:
    """Read frames in chunks: one read can bring many frames (runs answered together), each
    decoded without another await. The same checks as `read_frame`, before a body is
    buffered: a peer cannot make the reader hold more than `cap` plus one chunk."""

    def __init__(self, reader: asyncio.StreamReader, cap: int) -> None:
        self.reader = reader
        self.cap = cap
        self.buffer = bytearray()

    async def frames(self) -> list[Frame]:
        """Return the next complete frames (at least one); raise EOFError at a clean end,
        ProtocolError (FrameTooLarge) for anything broken."""
        while True:
            frames = self._complete()
            if frames:
                return frames
            chunk = await self.reader.read(_CHUNK)
            if not chunk:
                if self.buffer:
                    raise ProtocolError("truncated frame")
                raise EOFError
            self.buffer += chunk

    def _complete(self) -> list[Frame]:
        """Decode the complete frames buffered; a broken one raises once the good ones
        before it were handed out."""
        buffer, out, at = self.buffer, [], 0
        try:
            while len(buffer) - at >= _PREFIX.size:
                length, kind, head_length = _PREFIX.unpack_from(buffer, at)
                _check_prefix(length, head_length, self.cap)
                end = at + 4 + length
                if len(buffer) < end:
                    break
                head_at = at + _PREFIX.size
                blob_at = head_at + head_length
                head, blob = bytes(buffer[head_at:blob_at]), bytes(buffer[blob_at:end])
                out.append(_decode(kind, head, blob))
                at = end
        except ProtocolError:
            if not out:
                raise
        if at:
            del buffer[:at]
        return out


def _check_prefix(length: int, head_length: int, cap: int) -> None:
    if length > cap:
        raise FrameTooLarge(f"frame of {length} bytes, over the cap of {cap}", size=length)
    if head_length > HEADER_CAP or head_length > length - 5:
        raise ProtocolError("bad header length")


def _decode(kind: int, head: bytes, blob: bytes) -> Frame:
    try:
        header = json.loads(head)
        known = Kind(kind)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"undecodable frame ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise ProtocolError("the header is not a JSON object")
    return Frame(kind=known, header=header, blob=blob)


async def read_frame(reader: asyncio.StreamReader, cap: int) -> Frame:
    """Read one frame; raise EOFError at a clean end, ProtocolError for anything broken."""
    try:
        prefix = await reader.readexactly(_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EOFError from exc
        raise ProtocolError("truncated frame") from exc
    length, kind, head_length = _PREFIX.unpack(prefix)
    _check_prefix(length, head_length, cap)
    try:
        body = await reader.readexactly(length - 5)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("truncated frame") from exc
    return _decode(kind, body[:head_length], body[head_length:])
