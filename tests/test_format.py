"""Codecs of the repository format: every record roundtrips, and hostile bytes raise IntegrityError only."""

from __future__ import annotations

import os
import struct
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from drsvc.core import format as fmt
from drsvc.core.crypto import (
    HEADER,
    BlobType,
    Keys,
    ObjectType,
    PackCipher,
    Suite,
    new_master_key,
    parse_header,
)
from drsvc.core.errors import IntegrityError
from drsvc.core.format import (
    BlobEntry,
    Node,
    PackIndex,
    PackWriter,
    SnapshotRecord,
    decode_index,
    decode_payload,
    decode_snapshot,
    decode_tree,
    encode_index,
    encode_payload,
    encode_snapshot,
    encode_tree,
    read_pack_header,
)

SUITES = list(Suite)
NAME = "0123456789abcdef" * 2

ids32 = st.binary(min_size=32, max_size=32)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
hex_ids = st.text("0123456789abcdef", min_size=16, max_size=64)
# what msgpack can carry: any structure a hostile (or buggy) writer could have sealed
wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner, max_size=6),
    max_leaves=30,
)


def make_keys(suite: Suite = Suite.AES_256_GCM) -> Keys:
    return Keys(suite, os.urandom(16), new_master_key())


def flip(data: bytes, index: int, mask: int) -> bytes:
    i = index % len(data)
    return data[:i] + bytes([data[i] ^ mask]) + data[i + 1 :]


# ---- blob payloads --------------------------------------------------------------------------------


@given(
    data=st.binary(max_size=8192) | st.binary(max_size=64).map(lambda b: b * 100), level=st.integers(-7, 19)
)
def test_payload_roundtrip(data: bytes, level: int) -> None:
    payload = encode_payload(data, zstandard.ZstdCompressor(level=level))
    assert payload[0] in (fmt.CODEC_RAW, fmt.CODEC_ZSTD)
    assert len(payload) <= len(data) + 1  # compression never makes a blob bigger than raw + 1
    assert decode_payload(payload, len(data), zstandard.ZstdDecompressor(), "w") == data


def test_payload_codec_choice() -> None:
    cctx = zstandard.ZstdCompressor()
    assert encode_payload(b"a" * 10_000, cctx)[0] == fmt.CODEC_ZSTD
    assert encode_payload(os.urandom(10_000), cctx)[0] == fmt.CODEC_RAW
    assert encode_payload(memoryview(b"b" * 100), cctx)[0] == fmt.CODEC_ZSTD


def test_payload_rejects() -> None:
    dctx = zstandard.ZstdDecompressor()
    packed = encode_payload(b"a" * 10_000, zstandard.ZstdCompressor())
    for payload, raw_length, match in [
        (b"", 0, "empty"),
        (b"\x07abc", 3, "unknown blob codec"),
        (b"\x00abc", 4, "index says"),
        (packed, 9_999, "larger than the index says"),  # never inflated past raw_length
        (packed, 10_001, "index says"),
        (packed[:-3], 10_000, "decompress"),
        (b"\x01" + b"not zstd", 8, "decompress"),
    ]:
        with pytest.raises(IntegrityError, match=match):
            decode_payload(payload, raw_length, dctx, "w")


def test_payload_claiming_a_huge_frame_is_refused_before_allocating() -> None:
    """A zstd frame header may state any content size; decoding must not believe it past raw_length."""
    magic = zstandard.ZstdCompressor().compress(b"")[:4]
    raw_block = ((1 << 3) | 1).to_bytes(3, "little") + b"a"  # last block, raw, one byte
    forged = magic + bytes([0b11100000]) + struct.pack("<Q", 2**40) + raw_block  # single segment, 8-byte size
    assert zstandard.frame_content_size(forged) == 2**40
    with pytest.raises(IntegrityError, match="larger than the index says"):
        decode_payload(bytes([fmt.CODEC_ZSTD]) + forged, 1, zstandard.ZstdDecompressor(), "w")


# ---- packs ----------------------------------------------------------------------------------------

blob_specs = st.lists(
    st.tuples(st.sampled_from(list(BlobType)), ids32, st.binary(min_size=0, max_size=2048)), max_size=12
)


def build_pack(keys: Keys, blobs: list[tuple[BlobType, bytes, bytes]]) -> tuple[bytes, list[BlobEntry]]:
    writer = PackWriter(keys, NAME)
    cctx = zstandard.ZstdCompressor()
    entries = [writer.add(t, bid, encode_payload(raw, cctx), len(raw)) for t, bid, raw in blobs]
    return writer.finish(), entries


def read_whole_pack(keys: Keys, data: bytes) -> list[tuple[BlobType, bytes, bytes]]:
    """What `drsvc check` does with a pack: header, then every blob verified and decoded."""
    salt, entries = read_pack_header(keys, NAME, data)
    cipher = PackCipher(keys, salt)
    out = []
    for e in entries:
        payload = cipher.open_blob(e.btype, e.blob_id, data[e.offset : e.offset + e.length], NAME)
        out.append(
            (e.btype, e.blob_id, decode_payload(payload, e.raw_length, zstandard.ZstdDecompressor(), NAME))
        )
    return out


@pytest.mark.parametrize("suite", SUITES)
@given(blobs=blob_specs)
def test_pack_roundtrip(suite: Suite, blobs: list[tuple[BlobType, bytes, bytes]]) -> None:
    keys = make_keys(suite)
    data, entries = build_pack(keys, blobs)
    salt, read = read_pack_header(keys, NAME, data)
    assert read == entries
    assert parse_header(data, ObjectType.PACK, NAME) == (suite, salt)
    assert read_whole_pack(keys, data) == blobs
    # blobs lie back to back after the object header, each where its entry says
    offset = HEADER.size
    for e in entries:
        assert e.offset == offset
        offset += e.length


@pytest.mark.parametrize("suite", SUITES)
@given(blobs=blob_specs.filter(bool), index=st.integers(min_value=0), mask=st.integers(1, 255))
def test_tampered_pack_fails(
    suite: Suite, blobs: list[tuple[BlobType, bytes, bytes]], index: int, mask: int
) -> None:
    keys = make_keys(suite)
    data, _ = build_pack(keys, blobs)
    with pytest.raises(IntegrityError):
        read_whole_pack(keys, flip(data, index, mask))


@pytest.mark.parametrize("index", range(HEADER.size))
def test_every_pack_header_byte_is_checked(index: int) -> None:
    """The object header of a pack (magic, version, suite, type, reserved, salt) is not under the AEAD of
    its blobs: each byte must still be checked, deterministically, not only when a fuzzer happens on it."""
    keys = make_keys()
    data, _ = build_pack(keys, [(BlobType.DATA, os.urandom(32), b"x" * 100)])
    for mask in (0x01, 0x03, 0x80):
        with pytest.raises(IntegrityError):
            read_whole_pack(keys, flip(data, index, mask))


@given(blobs=blob_specs, cut=st.integers(min_value=1))
def test_truncated_pack_fails(blobs: list[tuple[BlobType, bytes, bytes]], cut: int) -> None:
    keys = make_keys()
    data, _ = build_pack(keys, blobs)
    with pytest.raises(IntegrityError):
        read_pack_header(keys, NAME, data[: len(data) - 1 - cut % len(data)])


def test_pack_bound_to_name_and_keys() -> None:
    keys = make_keys()
    data, _ = build_pack(keys, [(BlobType.DATA, os.urandom(32), b"x" * 100)])
    with pytest.raises(IntegrityError):
        read_pack_header(keys, NAME[::-1], data)
    with pytest.raises(IntegrityError):
        read_pack_header(make_keys(), NAME, data)
    with pytest.raises(IntegrityError, match="sealed with"):
        read_pack_header(Keys(Suite.SM4_GCM, keys.repo_id, keys.master), NAME, data)


def test_pack_entry_pointing_past_blobs_is_refused() -> None:
    keys = make_keys()
    writer = PackWriter(keys, NAME)
    writer.add(BlobType.DATA, os.urandom(32), b"\x00abc", 3)
    writer.entries[0] = BlobEntry(BlobType.DATA, writer.entries[0].blob_id, 24, 10_000, 3)
    with pytest.raises(IntegrityError, match="past"):
        read_pack_header(keys, NAME, writer.finish())


def test_add_sealed_matches_add() -> None:
    keys = make_keys()
    writer = PackWriter(keys, NAME)
    bid = os.urandom(32)
    sealed = writer.cipher.seal_blob(len(writer.entries) + 1, BlobType.TREE, bid, b"\x00tree")
    entry = writer.add_sealed(BlobType.TREE, bid, sealed, 4)
    data = writer.finish()
    assert read_pack_header(keys, NAME, data)[1] == [entry]
    assert read_whole_pack(keys, data) == [(BlobType.TREE, bid, b"tree")]


@pytest.mark.parametrize(
    "header",
    [
        [2, []],
        [1],
        [1, 5],
        [1, [[1, b"x" * 31, 24, 30, 1]]],
        [1, [[9, b"x" * 32, 24, 30, 1]]],
        [1, [[1, b"x" * 32, -1, 30, 1]]],
        [1, [[1, b"x" * 32, 24, 0, 1]]],
        [1, [[1, b"x" * 32, 24, float("inf"), 1]]],
        [1, [[1, 2**40, 24, 30, 1]]],
        "text",
    ],
)
def test_malformed_pack_header(header: Any) -> None:
    """A sealed header whose content is malformed (a writer's bug, or a key holder's forgery)."""
    keys = make_keys()
    cipher = PackCipher(keys)
    sealed = cipher.seal_header(NAME, msgpack.packb(header))
    data = cipher.header() + sealed + fmt.TRAILER.pack(len(sealed))
    with pytest.raises(IntegrityError):
        read_pack_header(keys, NAME, data)


# ---- index files ----------------------------------------------------------------------------------

entries = st.builds(
    BlobEntry,
    st.sampled_from(list(BlobType)),
    ids32,
    st.integers(0, 2**63),
    st.integers(1, 2**32),
    st.integers(0, 2**32),
)
pack_indexes = st.builds(
    PackIndex, hex_ids, st.binary(min_size=16, max_size=16), st.lists(entries, max_size=8).map(tuple)
)


@given(st.lists(pack_indexes, max_size=8))
def test_index_roundtrip(packs: list[PackIndex]) -> None:
    assert decode_index(encode_index(packs), "w") == packs
    assert decode_index(encode_index(iter(packs)), "w") == packs


@given(st.binary(max_size=200) | wire_values.map(msgpack.packb))
def test_index_decoder_takes_anything(data: bytes) -> None:
    try:
        decode_index(data, "index/x")
    except IntegrityError as exc:
        assert exc.fields["object"] == "index/x"


@pytest.mark.parametrize(
    "obj",
    [
        {"v": 2, "packs": []},
        {"packs": []},
        {"v": 1},
        {"v": 1, "packs": [["p", b"s" * 15, []]]},
        {"v": 1, "packs": [[5, b"s" * 16, []]]},
        {"v": 1, "packs": [["p", 16, []]]},
        {"v": 1, "packs": [["p", b"s" * 16, [[1, b"x" * 32, float("inf"), 1, 1]]]]},
        {"v": 1, "packs": [["p", b"s" * 16, [[1, 2**40, 0, 1, 1]]]]},
        [1, 2],
    ],
)
def test_malformed_index(obj: Any) -> None:
    with pytest.raises(IntegrityError):
        decode_index(msgpack.packb(obj), "w")


# ---- trees ----------------------------------------------------------------------------------------


@st.composite
def nodes(draw: st.DrawFn) -> Node:
    kind = draw(st.sampled_from([fmt.FILE, fmt.DIR, fmt.SYMLINK]))
    return Node(
        name=draw(st.binary(min_size=1, max_size=255)),  # POSIX names: any bytes, not UTF-8
        kind=kind,
        mode=draw(st.integers(0, 2**32 - 1)),
        mtime_ns=draw(i64),  # before 1970 too
        uid=draw(st.integers(0, 2**32 - 1)),
        gid=draw(st.integers(0, 2**32 - 1)),
        size=draw(st.integers(0, 2**63)),
        inode=draw(u64),
        ctime_ns=draw(i64),
        content=tuple(draw(st.lists(ids32, max_size=4))) if kind == fmt.FILE else (),
        subtree=draw(ids32) if kind == fmt.DIR else b"",
        target=draw(st.binary(max_size=100)) if kind == fmt.SYMLINK else b"",
        changed=draw(st.booleans()),
    )


@given(st.lists(nodes(), max_size=10, unique_by=lambda n: n.name))
def test_tree_roundtrip(tree: list[Node]) -> None:
    data = encode_tree(tree)
    assert decode_tree(data, "w") == sorted(tree, key=lambda n: n.name)
    assert encode_tree(reversed(tree)) == data  # one tree, one encoding: unchanged dirs dedup


def test_tree_with_extreme_values() -> None:
    node = Node(b"\xff\x00/..", fmt.FILE, 0o177777, -(2**63), 2**32 - 1, 2**32 - 1, 2**64 - 1, 2**64 - 1)
    assert decode_tree(encode_tree([node]), "w") == [node]
    with pytest.raises(OverflowError):  # msgpack carries 64 bits: encoding is where this fails
        encode_tree([Node(b"a", fmt.FILE, 0, 2**64)])


@given(st.binary(max_size=200) | wire_values.map(msgpack.packb))
def test_tree_decoder_takes_anything(data: bytes) -> None:
    try:
        decode_tree(data, "tree/x")
    except IntegrityError as exc:
        assert exc.fields["object"] == "tree/x"


GOOD_NODE = {"n": b"a", "k": "f", "m": 0o644, "t": 1}


@pytest.mark.parametrize(
    "node",
    [
        {**GOOD_NODE, "k": "x"},
        {**GOOD_NODE, "n": "text name"},
        {**GOOD_NODE, "n": 2**40},
        {**GOOD_NODE, "m": float("inf")},
        {**GOOD_NODE, "m": float("nan")},
        {**GOOD_NODE, "x": [b"short"]},
        {**GOOD_NODE, "x": 5},
        {**GOOD_NODE, "d": b"short"},
        {**GOOD_NODE, "l": 7},
        {"k": "f", "m": 1, "t": 1},
    ],
)
def test_malformed_tree(node: dict[str, Any]) -> None:
    with pytest.raises(IntegrityError):
        decode_tree(msgpack.packb({"v": 1, "nodes": [node]}), "w")
    assert decode_tree(msgpack.packb({"v": 1, "nodes": [GOOD_NODE]}), "w")[0].name == b"a"


# ---- snapshot records -----------------------------------------------------------------------------

records = st.builds(
    SnapshotRecord,
    id=hex_ids,
    tenant=st.text(max_size=20),
    source=st.text(max_size=20),
    time_ns=i64,
    tree=ids32,
    parent=st.none() | hex_ids,
    host=st.text(max_size=30),
    finished_ns=i64,
    partial=st.booleans(),
    warnings=st.lists(st.text(max_size=40), max_size=4).map(tuple),
    stats=st.dictionaries(st.text(max_size=10), i64, max_size=5),
    index=st.lists(hex_ids, max_size=4).map(tuple),
)


@given(records)
def test_snapshot_roundtrip(rec: SnapshotRecord) -> None:
    assert decode_snapshot(encode_snapshot(rec), "w") == rec


@given(st.binary(max_size=200) | wire_values.map(msgpack.packb))
def test_snapshot_decoder_takes_anything(data: bytes) -> None:
    try:
        decode_snapshot(data, "snapshots/x")
    except IntegrityError as exc:
        assert exc.fields["object"] == "snapshots/x"


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"tree": b"x" * 31},
        {"tree": 32},
        {"time": float("inf")},
        {"parent": 5},
        {"stats": {"files": "many"}},
        {"stats": [1]},
        {"index": 3},
    ],
)
def test_malformed_snapshot(change: dict[str, Any]) -> None:
    rec = SnapshotRecord("ab" * 8, "hr", "files", 1, b"t" * 32)
    obj = {**msgpack.unpackb(encode_snapshot(rec)), **change}
    with pytest.raises(IntegrityError):
        decode_snapshot(msgpack.packb(obj), "w")


# ---- the fast readers prune uses agree with the full decoders --------------------------------------


@given(st.lists(pack_indexes, max_size=8))
def test_index_wire_agrees_with_decode_index(packs: list[PackIndex]) -> None:
    data = encode_index(packs)
    fast = fmt.index_wire(data, "w")
    assert [(p, s, [BlobEntry.from_wire(w, "w") for w in wire]) for p, s, wire in fast] == [
        (p.pack, p.salt, list(p.blobs)) for p in packs
    ]


@given(st.binary(max_size=200) | wire_values.map(msgpack.packb))
def test_index_wire_reads_whatever_decode_index_reads(data: bytes) -> None:
    try:
        decode_index(data, "index/x")
        full_ok = True
    except IntegrityError:
        full_ok = False
    try:
        fmt.index_wire(data, "index/x")
        fast_ok = True
    except IntegrityError as exc:
        assert exc.fields["object"] == "index/x"
        fast_ok = False
    assert full_ok <= fast_ok  # whatever the full decoder reads, the fast one reads (and agrees: above)


@given(st.lists(nodes(), max_size=10, unique_by=lambda n: n.name))
def test_tree_refs_agree_with_decode_tree(tree: list[Node]) -> None:
    data = encode_tree(tree)
    full = decode_tree(data, "t")
    subtrees, chunks = fmt.tree_refs(data, "t")
    assert subtrees == [n.subtree for n in full if n.kind == fmt.DIR]
    assert chunks == [c for n in full for c in n.content]


@given(st.binary(max_size=200) | wire_values.map(msgpack.packb))
def test_tree_refs_read_whatever_decode_tree_reads(data: bytes) -> None:
    try:
        decode_tree(data, "tree/x")
        full_ok = True
    except IntegrityError:
        full_ok = False
    try:
        fmt.tree_refs(data, "tree/x")
        fast_ok = True
    except IntegrityError as exc:
        assert exc.fields["object"] == "tree/x"
        fast_ok = False
    assert full_ok <= fast_ok  # it checks what it reads (kinds, id lengths), not the fields it skips
