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


async def read_frame(reader: asyncio.StreamReader, cap: int) -> Frame:
    """Read one frame; raise EOFError at a clean end, ProtocolError for anything broken."""
    try:
        prefix = await reader.readexactly(_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EOFError from exc
        raise ProtocolError("truncated frame") from exc
    length, kind, head_length = _PREFIX.unpack(prefix)
    if length > cap:
        raise FrameTooLarge(f"frame of {length} bytes, over the cap of {cap}", size=length)
    if head_length > HEADER_CAP or head_length > length - 5:
        raise ProtocolError("bad header length")
    try:
        body = await reader.readexactly(length - 5)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("truncated frame") from exc
    try:
        header = json.loads(body[:head_length])
        known = Kind(kind)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"undecodable frame ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise ProtocolError("the header is not a JSON object")
    return Frame(kind=known, header=header, blob=body[head_length:])
