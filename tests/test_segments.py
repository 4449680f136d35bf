"""Change-log segment codec: every segment roundtrips, and hostile bytes raise IntegrityError only."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from drsvc.core import segments
from drsvc.core.crypto import Keys, Suite, new_master_key
from drsvc.core.errors import IntegrityError
from drsvc.core.segments import Append, Create, Delete, Move, Segment, SegmentName

u63 = st.integers(0, 2**63 - 1)
gens = st.integers(0, 2**40)
names = st.binary(min_size=1, max_size=40).filter(
    lambda b: b not in (b".", b"..") and b"/" not in b and b"\0" not in b
)
streams = st.text("0123456789abcdef", min_size=16, max_size=16)
wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=9),
    max_leaves=30,
)


def _event(kind: int, t: int, gen: int, path: bytes, off: int, data: bytes, mode: int) -> segments.Event:
    if kind == 1:
        return Create(t, gen, path, mode)
    if kind == 2:
        return Append(t, gen, off, data)
    if kind == 3:
        return Move(t, gen, path)
    return Delete(t, gen)


@st.composite
def segment_values(draw: st.DrawFn) -> Segment:
    t0 = draw(st.integers(0, 2**62))
    steps = draw(st.lists(st.integers(0, 10**9), min_size=1, max_size=12))
    events = []
    t = t0
    for step in steps:
        t += step
        events.append(
            _event(
                draw(st.integers(1, 4)),
                t,
                draw(gens),
                draw(names),
                draw(st.integers(0, 2**40)),
                draw(st.binary(min_size=1, max_size=200)),
                draw(st.integers(0, 0o7777)),
            )
        )
    seq = draw(st.integers(0, 2**40))
    prev = None if seq == 0 else str(SegmentName.new(draw(st.integers(0, 2**62)), draw(streams), seq - 1))
    base = draw(st.none() | st.text("0123456789abcdef", min_size=48, max_size=48)) if seq == 0 else None
    return Segment(
        base=base,
        source=draw(st.text(max_size=20)),
        stream=draw(streams),
        seq=seq,
        prev=prev,
        prev_digest=b"" if prev is None else draw(st.binary(min_size=32, max_size=32)),
        first_ns=events[0].time_ns,
        last_ns=events[-1].time_ns,
        events=tuple(events),
    )


@given(segment_values())
def test_segment_roundtrip(seg: Segment) -> None:
    plain = segments.encode_segment(seg)
    assert segments.decode_segment(plain, "w") == seg
    name = str(SegmentName.new(seg.first_ns, seg.stream, seg.seq))
    segments.check_named(seg, name, seg.source)
    with pytest.raises(IntegrityError):
        segments.check_named(seg, name, seg.source + "x")


@given(u63, streams, u63)
def test_name_roundtrip_and_order(first: int, stream: str, seq: int) -> None:
    n = SegmentName.new(first, stream, seq)
    assert len(str(n)) == 64 and SegmentName.parse(str(n)) == n
    later = SegmentName.new(first + 1, stream, seq)
    assert (str(n) < str(later)) == (n < later) == True  # noqa: E712 - names sort by time


@pytest.mark.parametrize("bad", ["", "0" * 63, "0" * 65, "G" * 64, "A" * 64, "f" * 64])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(IntegrityError):
        SegmentName.parse(bad)


@given(wire_values)
def test_arbitrary_wire_values_raise_integrity_error_only(value: Any) -> None:
    try:
        segments.decode_segment(msgpack.packb(value), "w")
    except IntegrityError:
        pass


@given(
    segment_values(),
    st.sampled_from(
        ["v", "source", "stream", "seq", "prev", "prev_digest", "first", "last", "events", "base"]
    ),
    wire_values,
)
def test_a_field_replaced_by_anything_is_refused_or_still_valid(seg: Segment, key: str, value: Any) -> None:
    obj = msgpack.unpackb(segments.encode_segment(seg))
    obj[key] = value
    try:
        out = segments.decode_segment(msgpack.packb(obj), "w")
    except IntegrityError:
        return
    assert out.events  # what passes is a well-formed segment
    assert all(a.time_ns <= b.time_ns for a, b in zip(out.events, out.events[1:], strict=False))


def _wire(seg: Segment) -> dict[str, Any]:
    obj: dict[str, Any] = msgpack.unpackb(segments.encode_segment(seg))
    return obj


BASE = Segment(
    "src", "0123456789abcdef", 0, None, b"", 5, 9, (Create(5, 0, b"a.log", 0o644), Append(9, 0, 0, b"x"))
)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda o: o.update(v=2), "version"),
        (lambda o: o.update(events=[]), "no events"),
        (lambda o: o.update(first=4), "first/last"),
        (lambda o: o.update(last=10), "first/last"),
        (lambda o: o["events"].reverse(), "time order"),
        (lambda o: o["events"][0].__setitem__(3, b"../x"), "unsafe path"),
        (lambda o: o["events"][0].__setitem__(3, b".."), "unsafe path"),
        (lambda o: o["events"][0].__setitem__(3, b""), "unsafe path"),
        (lambda o: o["events"][0].__setitem__(3, b"a\0b"), "unsafe path"),
        (lambda o: o["events"][1].__setitem__(4, b""), "non-empty"),
        (lambda o: o["events"][1].__setitem__(3, -1), "integer"),
        (lambda o: o["events"][1].__setitem__(0, 9), "integer"),
        (lambda o: o["events"][1].append(1), "elements"),
        (lambda o: o.update(prev="ab" * 32), "predecessor"),
        (lambda o: o.update(seq=3), "seq 0"),
        (lambda o: o.update(seq=3, prev="ab" * 32, prev_digest=b"short"), "predecessor"),
        (lambda o: o.update(stream="XYZ"), "stream"),
        (lambda o: o.update(seq=True), "integer"),
        (lambda o: o.update(base="nothex"), "base"),
        (lambda o: o.update(seq=1, prev="ab" * 32, prev_digest=b"d" * 32, base="ab" * 24), "base"),
    ],
)
def test_malformed_segments_are_refused(change: Any, match: str) -> None:
    obj = _wire(BASE)
    change(obj)
    with pytest.raises(IntegrityError, match=match):
        segments.decode_segment(msgpack.packb(obj), "w")


@pytest.mark.parametrize("suite", list(Suite))
def test_seal_open_roundtrip_and_tampering(suite: Suite) -> None:
    keys = Keys(suite, os.urandom(16), new_master_key())
    name = str(SegmentName.new(5, "0123456789abcdef", 0))
    cctx = zstandard.ZstdCompressor()
    for plain in (segments.encode_segment(BASE), os.urandom(3000), b"log line\n" * 5000):
        sealed = segments.seal_segment(keys, name, plain, cctx)
        assert segments.open_segment(keys, name, sealed) == plain
        other = str(SegmentName.new(6, "0123456789abcdef", 0))
        with pytest.raises(IntegrityError):  # the name is bound: a segment cannot be served as another
            segments.open_segment(keys, other, sealed)
        for i in (0, 5, 30, len(sealed) - 1):
            bad = bytearray(sealed)
            bad[i] ^= 1
            with pytest.raises(IntegrityError):
                segments.open_segment(keys, name, bytes(bad))
    assert len(segments.seal_segment(keys, name, b"log line\n" * 5000, cctx)) < 2000  # compressed


def test_oversized_frame_is_refused_before_decompressing() -> None:
    from drsvc.core import crypto
    from drsvc.core.crypto import ObjectType

    keys = Keys(Suite.AES_256_GCM, os.urandom(16), new_master_key())
    name = str(SegmentName.new(5, "0123456789abcdef", 0))
    # a frame header declaring MAX_PLAINTEXT + 1 bytes (single segment, 8-byte size), then an empty last block
    frame = b"\x28\xb5\x2f\xfd\xe0" + (segments.MAX_PLAINTEXT + 1).to_bytes(8, "little") + b"\x01\x00\x00"
    assert zstandard.frame_content_size(frame) == segments.MAX_PLAINTEXT + 1
    sealed = crypto.seal_object(keys, ObjectType.SEGMENT, name, bytes([segments.CODEC_ZSTD]) + frame)
    with pytest.raises(IntegrityError, match="oversized"):
        segments.open_segment(keys, name, sealed)
    sealed = crypto.seal_object(keys, ObjectType.SEGMENT, name, b"\x07junk")
    with pytest.raises(IntegrityError, match="codec"):
        segments.open_segment(keys, name, sealed)
