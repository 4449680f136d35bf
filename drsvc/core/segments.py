"""Change-log segments of `log` sources (docs/FORMAT.md section 17): names, codec, sealing.

Pure, like ``format``: bytes in, records out; decoders treat their input as hostile and raise IntegrityError
naming the object for anything malformed.

1. A segment is a sealed object of type 6 at ``<tenant>/logs/<source tag>/<name>``. Its name carries the time
   of its first event, its stream and its sequence number, so that a listing alone orders a source's segments,
   groups them by stream and shows a missing sequence number, without reading any of them.
2. Its plaintext (msgpack) names its predecessor and carries the keyed content id of the predecessor's
   plaintext: the segments of a stream form a hash chain, checked at restore.
3. Events identify a file incarnation by its generation number (unique within the stream), not by its path:
   ``CREATE`` (a new, empty incarnation at a path: a new file, a file replaced by another inode, or a
   truncated one), ``APPEND`` (bytes at an offset, which must be the incarnation's length so far), ``MOVE``
   (renamed: rotation), ``DELETE`` (gone from the directory). Replaying a stream's events in order rebuilds
   the directory at any event time.
4. Sealed body = codec byte (0 raw, 1 zstd) + data, sealed with ``crypto.seal_object`` (AAD binds the name).
"""

from __future__ import annotations

import enum
import itertools
import os
import re
from dataclasses import dataclass
from typing import Any

import msgpack
import zstandard

from drsvc.core import crypto
from drsvc.core.crypto import Keys, ObjectType
from drsvc.core.errors import IntegrityError

VERSION = 1
DIGEST_LEN = 32
STREAM_HEX = 16  # a stream id: 8 random bytes, hex
NAME_LEN = 64
# A segment holds at most sources.*.segment_max (<= 256 MiB) of appended data plus its event framing; a
# decoder refuses a plaintext larger than this before decompressing it.
MAX_PLAINTEXT = 257 * 1024 * 1024
MAX_PATH = 255  # one POSIX file name: log directories are watched one level deep
CODEC_RAW = 0
CODEC_ZSTD = 1

_NAME = re.compile(r"^[0-9a-f]{64}$")
_STREAM = re.compile(r"^[0-9a-f]{16}$")
_RECORD = re.compile(r"^[0-9a-f]{16,64}$")
_MALFORMED = (ValueError, TypeError, KeyError, AttributeError, OverflowError, msgpack.UnpackException)
_U63 = 2**63 - 1


class EventKind(enum.IntEnum):
    CREATE = 1
    APPEND = 2
    MOVE = 3
    DELETE = 4


@dataclass(frozen=True, slots=True)
class Create:
    """A new, empty file incarnation `gen` at `path` (created, replaced by another inode, or truncated)."""

    time_ns: int
    gen: int
    path: bytes
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class Append:
    """`data` written at `offset` of incarnation `gen`; `offset` is always the incarnation's length so far."""

    time_ns: int
    gen: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Move:
    """Incarnation `gen` is now at `path` (a rename: rotation)."""

    time_ns: int
    gen: int
    path: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    """Incarnation `gen` is gone from the directory (unlinked, renamed over, or truncated)."""

    time_ns: int
    gen: int


Event = Create | Append | Move | Delete


@dataclass(frozen=True, slots=True, order=True)
class SegmentName:
    """The parts of a segment's object name: 64 hex digits, sorting by time."""

    first_ns: int  # time of the segment's first event
    stream: str  # 16 hex digits
    seq: int  # 0, 1, 2, ... within the stream
    nonce: str  # 16 random hex digits: a segment cut again after a crash gets a name of its own

    def __str__(self) -> str:
        return f"{self.first_ns:016x}{self.stream}{self.seq:016x}{self.nonce}"

    @classmethod
    def new(cls, first_ns: int, stream: str, seq: int) -> SegmentName:
        return cls(first_ns, stream, seq, os.urandom(8).hex())

    @classmethod
    def parse(cls, name: str) -> SegmentName:
        """The parts of a segment name; IntegrityError for anything else (a listing may hold strays)."""
        if not _NAME.fullmatch(name):
            raise IntegrityError("not a segment name (64 lowercase hex digits)", object=name)
        first, seq = int(name[0:16], 16), int(name[32:48], 16)
        if first > _U63 or seq > _U63:
            raise IntegrityError("segment name out of range", object=name)
        return cls(first, name[16:32], seq, name[48:64])


def new_stream_id() -> str:
    return os.urandom(8).hex()


@dataclass(frozen=True)
class Segment:
    source: str
    stream: str
    seq: int
    prev: str | None  # the predecessor's name; None for the first segment of a stream
    prev_digest: bytes  # keyed content id of the predecessor's plaintext; b"" for the first
    first_ns: int  # time of the first event
    last_ns: int  # time of the last event
    events: tuple[Event, ...]
    # seq 0 of a stream that starts from a checkpoint: the id of that checkpoint (a snapshot record of the
    # same source whose i-th file, in its tree's name order, is generation i); None: the stream starts empty
    base: str | None = None

    @property
    def data_bytes(self) -> int:
        return sum(len(e.data) for e in self.events if isinstance(e, Append))


def _event_to_wire(e: Event) -> list[Any]:
    if isinstance(e, Append):
        return [int(EventKind.APPEND), e.time_ns, e.gen, e.offset, e.data]
    if isinstance(e, Create):
        return [int(EventKind.CREATE), e.time_ns, e.gen, e.path, e.mode]
    if isinstance(e, Move):
        return [int(EventKind.MOVE), e.time_ns, e.gen, e.path]
    return [int(EventKind.DELETE), e.time_ns, e.gen]


def _int(v: Any, lo: int = 0, hi: int = _U63) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"integer in {lo}..{hi} expected, got {v!r}")
    return v


def _path(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise TypeError("path must be bytes")
    if not 0 < len(v) <= MAX_PATH or v in (b".", b"..") or b"/" in v or b"\0" in v:
        raise ValueError(f"unsafe path {v!r}")
    return v


def _event_from_wire(w: Any) -> Event:
    if not isinstance(w, list) or len(w) < 3:
        raise ValueError("an event is an array of at least 3 elements")
    kind, t, gen = EventKind(_int(w[0], 1, 4)), _int(w[1]), _int(w[2])
    if kind is EventKind.APPEND and len(w) == 5:
        if not isinstance(w[4], bytes) or not w[4]:
            raise ValueError("append data must be non-empty bytes")
        return Append(t, gen, _int(w[3]), w[4])
    if kind is EventKind.CREATE and len(w) == 5:
        return Create(t, gen, _path(w[3]), _int(w[4], 0, 0o7777))
    if kind is EventKind.MOVE and len(w) == 4:
        return Move(t, gen, _path(w[3]))
    if kind is EventKind.DELETE and len(w) == 3:
        return Delete(t, gen)
    raise ValueError(f"{kind.name} event with {len(w)} elements")


def encode_segment(s: Segment) -> bytes:
    """The plaintext of a segment (msgpack). Events must be in time order."""
    return msgpack.packb(
        {
            "v": VERSION,
            "source": s.source,
            "stream": s.stream,
            "seq": s.seq,
            "prev": s.prev,
            "prev_digest": s.prev_digest,
            "first": s.first_ns,
            "last": s.last_ns,
            "events": [_event_to_wire(e) for e in s.events],
            "base": s.base,
        }
    )


def decode_segment(data: bytes, where: str) -> Segment:
    """A segment's plaintext, checked: field types and ranges, safe paths, events in time order with
    `first`/`last` their first and last times, `prev` and `prev_digest` both present or both absent, a
    `base` only in segment 0."""
    try:
        o = msgpack.unpackb(data)
        if not isinstance(o, dict) or o.get("v") != VERSION:
            raise ValueError(f"unsupported segment version {o.get('v') if isinstance(o, dict) else o!r}")
        source, stream, prev, digest = o["source"], o["stream"], o["prev"], o["prev_digest"]
        if not isinstance(source, str) or not isinstance(stream, str) or not _STREAM.fullmatch(stream):
            raise ValueError("bad source or stream")
        seq = _int(o["seq"])
        if not isinstance(digest, bytes):
            raise TypeError("prev_digest must be bytes")
        if prev is None:
            if digest or seq != 0:
                raise ValueError("only the first segment of a stream (seq 0) has no predecessor")
        elif not isinstance(prev, str) or not _NAME.fullmatch(prev) or len(digest) != DIGEST_LEN:
            raise ValueError("bad predecessor name or digest")
        elif seq == 0:
            raise ValueError("segment 0 of a stream cannot have a predecessor")
        base = o["base"]
        if base is not None and (seq != 0 or not isinstance(base, str) or not _RECORD.fullmatch(base)):
            raise ValueError("only segment 0 of a stream has a base, and it is a snapshot record id")
        events = tuple(_event_from_wire(w) for w in o["events"])
        first, last = _int(o["first"]), _int(o["last"])
    except _MALFORMED as exc:
        raise IntegrityError(f"malformed segment: {exc}", object=where) from None
    if not events:
        raise IntegrityError("segment has no events", object=where)
    times = [e.time_ns for e in events]
    if any(a > b for a, b in itertools.pairwise(times)):
        raise IntegrityError("segment events are not in time order", object=where)
    if times[0] != first or times[-1] != last:
        raise IntegrityError("segment first/last do not match its events", object=where)
    return Segment(source, stream, seq, prev, digest, first, last, events, base)


def check_named(seg: Segment, name: str, source: str) -> None:
    """A decoded segment must be the one its (authenticated) name says: same stream, seq, first time, and
    the source asked for."""
    n = SegmentName.parse(name)
    if (seg.stream, seg.seq, seg.first_ns) != (n.stream, n.seq, n.first_ns) or seg.source != source:
        raise IntegrityError("segment does not match its name or source", object=name)


def seal_segment(keys: Keys, name: str, plaintext: bytes, cctx: zstandard.ZstdCompressor) -> bytes:
    """Compress (when it helps), then seal. Blocking CPU work: call from a worker thread."""
    packed = cctx.compress(plaintext)
    body = bytes([CODEC_ZSTD]) + packed if len(packed) < len(plaintext) else bytes([CODEC_RAW]) + plaintext
    return crypto.seal_object(keys, ObjectType.SEGMENT, name, body)


def open_segment(keys: Keys, name: str, sealed: bytes) -> bytes:
    """The plaintext of a sealed segment: authenticated, then decompressed within MAX_PLAINTEXT."""
    body = crypto.open_object(keys, ObjectType.SEGMENT, name, sealed)
    if not body:
        raise IntegrityError("empty segment body", object=name)
    if body[0] == CODEC_RAW:
        return body[1:]
    if body[0] != CODEC_ZSTD:
        raise IntegrityError(f"unknown segment codec {body[0]}", object=name)
    try:
        declared = zstandard.frame_content_size(body[1:])
        if declared > MAX_PLAINTEXT:
            raise IntegrityError("segment frame declares an oversized plaintext", object=name)
        out: bytes = zstandard.ZstdDecompressor().decompress(body[1:], max_output_size=MAX_PLAINTEXT)
        return out
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"segment does not decompress: {exc}", object=name) from None


__all__ = [
    "Append",
    "Create",
    "Delete",
    "Event",
    "EventKind",
    "Move",
    "Segment",
    "SegmentName",
    "check_named",
    "decode_segment",
    "encode_segment",
    "new_stream_id",
    "open_segment",
    "seal_segment",
]
