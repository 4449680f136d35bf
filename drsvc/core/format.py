"""Codecs of the repository format, version 1 (docs/FORMAT.md).

Everything here is pure: bytes in, records out. Sealing lives in ``crypto``; naming in ``layout``.
Decoders treat their input as hostile: anything malformed raises IntegrityError naming the object.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zstandard

from drsvc.core.crypto import BlobType, Keys, PackCipher
from drsvc.core.errors import IntegrityError

FORMAT = 1
TRAILER = struct.Struct("<I")
# what a decoder may raise on malformed input; it is reported as IntegrityError
_MALFORMED = (ValueError, TypeError, KeyError, AttributeError, OverflowError, msgpack.UnpackException)


def _bytes(v: Any) -> bytes:
    """A bytes field of decoded input (``bytes(n)`` of a hostile integer would allocate n bytes)."""
    if not isinstance(v, bytes):
        raise TypeError(f"expected bytes, got {type(v).__name__}")
    return v


# ---- blob payloads ----------------------------------------------------------------------------------

CODEC_RAW = 0
CODEC_ZSTD = 1


def encode_payload(data: bytes | memoryview, cctx: zstandard.ZstdCompressor) -> bytes:
    """The plaintext of a blob before sealing: a codec byte, then zstd of the data or the data itself."""
    packed = cctx.compress(data)
    if len(packed) < len(data):
        return bytes([CODEC_ZSTD]) + packed
    return bytes([CODEC_RAW]) + bytes(data)


def decode_payload(payload: bytes, raw_length: int, dctx: zstandard.ZstdDecompressor, where: str) -> bytes:
    if not payload:
        raise IntegrityError("empty blob payload", object=where)
    if payload[0] == CODEC_RAW:
        data = payload[1:]
    elif payload[0] == CODEC_ZSTD:
        try:
            # max_output_size does not bound a frame that states its own size: check what it states first
            if zstandard.frame_content_size(payload[1:]) > raw_length:
                raise IntegrityError(f"blob frame is larger than the index says ({raw_length})", object=where)
            data = dctx.decompress(payload[1:], max_output_size=raw_length)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"blob does not decompress: {exc}", object=where) from None
    else:
        raise IntegrityError(f"unknown blob codec {payload[0]}", object=where)
    if len(data) != raw_length:
        raise IntegrityError(f"blob is {len(data)} bytes, index says {raw_length}", object=where)
    return data


# ---- packs ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """Where one blob lies in its pack: offsets from the start of the pack object."""

    btype: BlobType
    blob_id: bytes
    offset: int
    length: int
    raw_length: int

    def to_wire(self) -> list[Any]:
        return [int(self.btype), self.blob_id, self.offset, self.length, self.raw_length]

    @classmethod
    def from_wire(cls, w: Any, where: str) -> BlobEntry:
        try:
            t, bid, off, ln, raw = w
            entry = cls(BlobType(t), _bytes(bid), int(off), int(ln), int(raw))
        except _MALFORMED as exc:
            raise IntegrityError(f"malformed blob entry: {exc}", object=where) from None
        if len(entry.blob_id) != 32 or entry.offset < 0 or entry.length <= 0 or entry.raw_length < 0:
            raise IntegrityError("blob entry out of range", object=where)
        return entry


class PackWriter:
    """Builds one pack: sealed blobs back to back, then the sealed header and its length.

    With a `sink`, every piece goes to it as soon as it is sealed (the pack is never held in memory) and
    ``finish`` returns b""; without one, ``finish`` returns the whole pack.
    """

    def __init__(self, keys: Keys, name: str, sink: Callable[[bytes], object] | None = None) -> None:
        self.name = name
        self.cipher = PackCipher(keys)
        self._parts: list[bytes] = []
        self._sink = sink if sink is not None else self._parts.append
        header = self.cipher.header()
        self._sink(header)
        self.size = len(header)
        self.entries: list[BlobEntry] = []

    def add(self, btype: BlobType, blob_id: bytes, payload: bytes, raw_length: int) -> BlobEntry:
        sealed = self.cipher.seal_blob(len(self.entries) + 1, btype, blob_id, payload)
        entry = BlobEntry(btype, blob_id, self.size, len(sealed), raw_length)
        self._sink(sealed)
        self.size += len(sealed)
        self.entries.append(entry)
        return entry

    def add_sealed(self, btype: BlobType, blob_id: bytes, sealed: bytes, raw_length: int) -> BlobEntry:
        """Append a blob sealed elsewhere with ``cipher.seal_blob(counter=len(entries) + 1, ...)``."""
        entry = BlobEntry(btype, blob_id, self.size, len(sealed), raw_length)
        self._sink(sealed)
        self.size += len(sealed)
        self.entries.append(entry)
        return entry

    def finish(self) -> bytes:
        header = msgpack.packb([FORMAT, [e.to_wire() for e in self.entries]])
        sealed = self.cipher.seal_header(self.name, header)
        self._sink(sealed)
        self._sink(TRAILER.pack(len(sealed)))
        self.size += len(sealed) + TRAILER.size
        return b"".join(self._parts)


def read_pack_header(keys: Keys, name: str, data: bytes) -> tuple[bytes, list[BlobEntry]]:
    """The salt and blob entries of a whole pack object (used by check and index rebuild)."""
    from drsvc.core.crypto import ObjectType, parse_header

    suite, salt = parse_header(data, ObjectType.PACK, name)
    if suite is not keys.suite:  # the pack's own header is not under its AEAD: check what it claims
        raise IntegrityError(
            f"pack sealed with {suite.value}, repository uses {keys.suite.value}", object=name
        )
    if len(data) < 24 + TRAILER.size:
        raise IntegrityError("pack too short", object=name)
    (hlen,) = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    start = len(data) - TRAILER.size - hlen
    if hlen <= 0 or start < 24:
        raise IntegrityError("pack header length out of range", object=name)
    plain = PackCipher(keys, salt).open_header(name, memoryview(data)[start : len(data) - TRAILER.size])
    entries = _unpack_entries(plain, name)
    for e in entries:
        if e.offset + e.length > start:
            raise IntegrityError("blob entry points past the pack's blobs", object=name)
    return salt, entries


def _unpack_entries(plain: bytes, where: str) -> list[BlobEntry]:
    try:
        version, wire = msgpack.unpackb(plain)
        if version != FORMAT:
            raise IntegrityError(f"unsupported pack header version {version}", object=where)
        return [BlobEntry.from_wire(w, where) for w in wire]
    except _MALFORMED as exc:
        raise IntegrityError(f"malformed pack header: {exc}", object=where) from None


# ---- index files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackIndex:
    """The index entries of one pack."""

    pack: str
    salt: bytes
    blobs: tuple[BlobEntry, ...]


def encode_index(packs: Iterable[PackIndex]) -> bytes:
    body = [[p.pack, p.salt, [b.to_wire() for b in p.blobs]] for p in packs]
    return msgpack.packb({"v": FORMAT, "packs": body})


def decode_index(data: bytes, where: str) -> list[PackIndex]:
    try:
        obj = msgpack.unpackb(data)
        if obj.get("v") != FORMAT:
            raise ValueError(f"unsupported index version {obj.get('v')}")
        out = []
        for name, salt, blobs in obj["packs"]:
            if not isinstance(name, str) or len(salt) != 16:
                raise ValueError("bad pack entry")
            out.append(PackIndex(name, _bytes(salt), tuple(BlobEntry.from_wire(b, where) for b in blobs)))
        return out
    except _MALFORMED as exc:
        raise IntegrityError(f"malformed index: {exc}", object=where) from None


def index_wire(data: bytes, where: str) -> list[tuple[str, bytes, list[list[Any]]]]:
    """An index's packs with their entries as checked wire lists ``[type, id, offset, length, raw length]``,
    without building a BlobEntry per blob (prune reads millions): the same checks as ``decode_index``."""
    try:
        obj = msgpack.unpackb(data)
        if obj.get("v") != FORMAT:
            raise ValueError(f"unsupported index version {obj.get('v')}")
        out = []
        for name, salt, blobs in obj["packs"]:
            if not isinstance(name, str) or not isinstance(salt, bytes) or len(salt) != 16:
                raise ValueError("bad pack entry")
            for w in blobs:
                t, bid, off, ln, raw = w
                if (
                    t not in (1, 2)
                    or not isinstance(bid, bytes)
                    or len(bid) != 32
                    or not (isinstance(off, int) and isinstance(ln, int) and isinstance(raw, int))
                    or off < 0
                    or ln <= 0
                    or raw < 0
                ):
                    raise ValueError("blob entry out of range")
            out.append((name, salt, blobs))
        return out
    except _MALFORMED as exc:
        raise IntegrityError(f"malformed index: {exc}", object=where) from None


# ---- trees ------------------------------------------------------------------------------------------

FILE, DIR, SYMLINK = "f", "d", "l"


@dataclass(frozen=True, slots=True)
class Node:
    """One directory entry. Names are bytes (POSIX names need not be UTF-8)."""

    name: bytes
    kind: str
    mode: int
    mtime_ns: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    inode: int = 0
    ctime_ns: int = 0
    content: tuple[bytes, ...] = ()  # chunk ids, for files
    subtree: bytes = b""  # tree blob id, for directories
    target: bytes = b""  # link target, for symlinks
    changed: bool = False  # the file changed while it was read: content is a best effort

    def to_wire(self) -> dict[str, Any]:
        w: dict[str, Any] = {"n": self.name, "k": self.kind, "m": self.mode, "t": self.mtime_ns}
        for key, val in (
            ("u", self.uid),
            ("g", self.gid),
            ("s", self.size),
            ("i", self.inode),
            ("c", self.ctime_ns),
        ):
            if val:
                w[key] = val
        if self.content:
            w["x"] = list(self.content)
        if self.subtree:
            w["d"] = self.subtree
        if self.target:
            w["l"] = self.target
        if self.changed:
            w["ch"] = True
        return w

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Node:
        node = cls(
            name=_bytes(w["n"]),
            kind=str(w["k"]),
            mode=int(w["m"]),
            mtime_ns=int(w["t"]),
            uid=int(w.get("u", 0)),
            gid=int(w.get("g", 0)),
            size=int(w.get("s", 0)),
            inode=int(w.get("i", 0)),
            ctime_ns=int(w.get("c", 0)),
            content=tuple(_bytes(c) for c in w.get("x", ())),
            subtree=_bytes(w.get("d", b"")),
            target=_bytes(w.get("l", b"")),
            changed=bool(w.get("ch", False)),
        )
        if node.kind not in (FILE, DIR, SYMLINK):
            raise ValueError(f"unknown node kind {node.kind!r}")
        if any(len(c) != 32 for c in node.content) or (node.subtree and len(node.subtree) != 32):
            raise ValueError("content ids must be 32 bytes")
        return node


def encode_tree(nodes: Iterable[Node]) -> bytes:
    ordered = sorted(nodes, key=lambda n: n.name)
    return msgpack.packb({"v": FORMAT, "nodes": [n.to_wire() for n in ordered]})


def decode_tree(data: bytes, where: str) -> list[Node]:
    try:
        obj = msgpack.unpackb(data)
        if obj.get("v") != FORMAT:
            raise ValueError(f"unsupported tree version {obj.get('v')}")
        return [Node.from_wire(w) for w in obj["nodes"]]
    except _MALFORMED as exc:
        raise IntegrityError(f"malformed tree: {exc}", object=where) from None


def tree_refs(data: bytes, where: str) -> tuple[list[bytes], list[bytes]]:
    """The subtree ids and the chunk ids a tree references, without building Nodes (prune walks millions of
    them); kinds and id lengths are checked as ``decode_tree`` does."""
    try:
        obj = msgpack.unpackb(data)
        if obj.get("v") != FORMAT:
            raise ValueError(f"unsupported tree version {obj.get('v')}")
        subtrees: list[bytes] = []
        chunks: list[bytes] = []
        for w in obj["nodes"]:
            kind = w["k"]
            if kind == DIR:
                d = w["d"]
                if not isinstance(d, bytes) or len(d) != 32:
                    raise ValueError("subtree id must be 32 bytes")
                subtrees.append(d)
            elif kind == FILE:
                x = w.get("x", ())
                if any(not isinstance(c, bytes) or len(c) != 32 for c in x):
                    raise ValueError("content ids must be 32 bytes")
                chunks.extend(x)
            elif kind != SYMLINK:
                raise ValueError(f"unknown node kind {kind!r}")
        return subtrees, chunks
    except _MALFORMED as exc:
        raise IntegrityError(f"malformed tree: {exc}", object=where) from None


# ---- snapshot records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotRecord:
    id: str
    tenant: str
    source: str
    time_ns: int  # the point in time the snapshot represents (scan start), UTC nanoseconds
    tree: bytes  # root tree blob id
    parent: str | None = None
    host: str = ""
    finished_ns: int = 0
    partial: bool = False
    warnings: tuple[str, ...] = ()
    stats: dict[str, int] = field(default_factory=dict)
    index: tuple[str, ...] = ()  # index objects written by this snapshot
    root: Node | None = None  # the source directory itself (mode, owner, mtime); records before it: None


def encode_snapshot(s: SnapshotRecord) -> bytes:
    return msgpack.packb(
        {
            "v": FORMAT,
            "id": s.id,
            "tenant": s.tenant,
            "source": s.source,
            "time": s.time_ns,
            "tree": s.tree,
            "parent": s.parent,
            "host": s.host,
            "finished": s.finished_ns,
            "partial": s.partial,
            "warnings": list(s.warnings),
            "stats": s.stats,
            "index": list(s.index),
            **({"root": s.root.to_wire()} if s.root is not None else {}),
        }
    )


def decode_snapshot(data: bytes, where: str) -> SnapshotRecord:
    try:
        o = msgpack.unpackb(data)
        if o.get("v") != FORMAT:
            raise ValueError(f"unsupported snapshot version {o.get('v')}")
        tree = _bytes(o["tree"])
        if len(tree) != 32:
            raise ValueError("tree id must be 32 bytes")
        if o["parent"] is not None and not isinstance(o["parent"], str):
            raise ValueError("parent must be a snapshot id")
        return SnapshotRecord(
            id=str(o["id"]),
            tenant=str(o["tenant"]),
            source=str(o["source"]),
            time_ns=int(o["time"]),
            tree=tree,
            parent=o["parent"],
            host=str(o["host"]),
            finished_ns=int(o["finished"]),
            partial=bool(o["partial"]),
            warnings=tuple(str(w) for w in o["warnings"]),
            stats={str(k): int(v) for k, v in o["stats"].items()},
            index=tuple(str(i) for i in o["index"]),
            root=Node.from_wire(o["root"]) if "root" in o else None,
        )
    except _MALFORMED as exc:
        raise IntegrityError(f"malformed snapshot record: {exc}", object=where) from None


# ---- prune markers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneMarker:
    """Packs a prune run condemned: each is deleted by a later run once its grace period has passed, if it is
    still unused then. Writers must not deduplicate against a condemned pack's blobs."""

    id: str
    time_ns: int  # when the marker was written
    host: str
    packs: dict[str, int]  # pack name -> when it was first condemned (ns since the epoch)


def encode_prune_marker(m: PruneMarker) -> bytes:
    return msgpack.packb(
        {"v": FORMAT, "id": m.id, "time": m.time_ns, "host": m.host, "packs": sorted(m.packs.items())}
    )


def decode_prune_marker(data: bytes, where: str) -> PruneMarker:
    try:
        o = msgpack.unpackb(data)
        if o.get("v") != FORMAT:
            raise ValueError(f"unsupported prune marker version {o.get('v')}")
        packs = {}
        for name, t in o["packs"]:
            if not isinstance(name, str) or not isinstance(t, int):
                raise ValueError("bad pack entry")
            packs[name] = t
        return PruneMarker(str(o["id"]), int(o["time"]), str(o["host"]), packs)
    except _MALFORMED as exc:
        raise IntegrityError(f"malformed prune marker: {exc}", object=where) from None
