"""The frame protocol on a real stream: frames whole, split anywhere, many at once, hostile.

Both readers (`read_frame`, one frame per call, for a host's hello; `FrameReader`, in chunks,
for everything after) must give the same frames for any split of the bytes, and refuse a
frame over the cap from its prefix alone, before its body is buffered.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from aisoc_plugind.engine.hosts.protocol import (
    HEADER_CAP,
    Frame,
    FrameReader,
    FrameTooLarge,
    Kind,
    ProtocolError,
    encode,
    read_frame,
)

FRAMES = [
    (Kind.RUN, {"id": 1, "key": "a#1", "payload": {"ip": "1.1.1.1"}, "context": {}}, b""),
    (Kind.RESULT, {"id": 1}, b'{"ok":true}'),
    (Kind.LOAD, {"id": 2, "files": [["plugin.py", 3]]}, b"x=1"),
    (Kind.ERROR, {"id": 3, "code": "plugin_error", "message": "é ü 中"}, b""),
    (Kind.STOP, {}, b""),
]
WIRE = b"".join(encode(kind, header, blob) for kind, header, blob in FRAMES)


def _stream(*chunks: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=2**16)
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    return reader


async def _all(frames: FrameReader) -> list[Frame]:
    out: list[Frame] = []
    while True:
        try:
            out += await frames.frames()
        except EOFError:
            return out


def _as_tuples(frames: list[Frame]) -> list[tuple[Kind, dict[str, object], bytes]]:
    return [(f.kind, f.header, f.blob) for f in frames]


async def test_many_frames_in_one_chunk_come_out_at_once() -> None:
    frames = FrameReader(_stream(WIRE), cap=1 << 20)
    assert _as_tuples(await frames.frames()) == FRAMES
    with pytest.raises(EOFError):
        await frames.frames()


@pytest.mark.parametrize("step", [1, 2, 3, 7, 13, 64])
async def test_frames_split_anywhere_come_out_whole_and_in_order(step: int) -> None:
    chunks = [WIRE[i : i + step] for i in range(0, len(WIRE), step)]
    assert _as_tuples(await _all(FrameReader(_stream(*chunks), cap=1 << 20))) == FRAMES


async def test_both_readers_agree() -> None:
    reader = _stream(WIRE)
    one_by_one = [await read_frame(reader, 1 << 20) for _ in FRAMES]
    assert _as_tuples(one_by_one) == FRAMES


async def test_a_frame_over_the_cap_is_refused_from_its_prefix() -> None:
    """Only the 9-byte prefix has arrived (no EOF): refused without waiting for the body."""
    big = encode(Kind.RESULT, {"id": 1}, b"x" * 5000)
    frames = FrameReader(_stream(big[:9], eof=False), cap=1000)
    with pytest.raises(FrameTooLarge) as refused:
        await asyncio.wait_for(frames.frames(), 5)
    assert refused.value.size == len(big) - 4
    with pytest.raises(FrameTooLarge):
        await read_frame(_stream(big[:9], eof=False), 1000)


@pytest.mark.parametrize(
    "prefix",
    [
        struct.pack(">IBI", 20, Kind.RESULT, 100),  # a header longer than the frame
        struct.pack(">IBI", HEADER_CAP + 100, Kind.RESULT, HEADER_CAP + 1),  # over the cap
        struct.pack(">IBI", 3, Kind.RESULT, 0),  # shorter than its own fields
    ],
)
async def test_a_bad_header_length_is_a_protocol_error(prefix: bytes) -> None:
    with pytest.raises(ProtocolError):
        await FrameReader(_stream(prefix + b"{}" * 10), cap=1 << 30).frames()


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"],
    ids=["not-json", "list", "string", "bad-utf8"],
)
async def test_a_header_that_is_no_json_object_is_a_protocol_error(body: bytes) -> None:
    frame = struct.pack(">IBI", 5 + len(body), Kind.RESULT, len(body)) + body
    with pytest.raises(ProtocolError):
        await FrameReader(_stream(frame), cap=1 << 20).frames()


async def test_an_unknown_kind_is_a_protocol_error() -> None:
    frame = struct.pack(">IBI", 7, 99, 2) + b"{}"
    with pytest.raises(ProtocolError):
        await FrameReader(_stream(frame), cap=1 << 20).frames()


async def test_a_stream_that_ends_inside_a_frame_is_truncated() -> None:
    frames = FrameReader(_stream(WIRE[:-3]), cap=1 << 20)
    got = await frames.frames()
    assert _as_tuples(got) == FRAMES[:-1]
    with pytest.raises(ProtocolError, match="truncated"):
        await frames.frames()


async def test_frames_before_a_broken_one_are_not_lost_between_reads() -> None:
    """A good frame read in one chunk is returned before a later chunk turns out broken."""
    good = encode(Kind.RESULT, {"id": 7}, b"{}")
    frames = FrameReader(_stream(good, b"\x00\x00\x00\x07\x63\x00\x00\x00\x02{}"), cap=1 << 20)
    first = await frames.frames()
    assert [f.header["id"] for f in first] == [7]
    with pytest.raises(ProtocolError):
        await frames.frames()
