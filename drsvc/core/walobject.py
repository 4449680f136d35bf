"""WAL objects: one PostgreSQL WAL file (segment, history or backup-history file), compressed and sealed.

    <tenant>/wal/<source tag>/<WAL file name>      a sealed object of type 7 (``crypto.ObjectType.WAL``)

    object    = header (24 bytes) || AEAD_objectkey(nonce 0, plaintext, AAD = header || WAL file name)
    plaintext = n (u32 BE) || meta (n bytes, msgpack) || payload
    meta      = {"v": 1, "source": str, "name": str, "size": int, "time": int, "sysid": int}
    payload   = codec byte || data             (docs/FORMAT.md section 8: zstd when shorter, else raw)

A reader requires `name` to equal the object's name and `source` the source it asked for (the associated
data binds the name already; the source, which the key does not show, only through meta), and the data to
be exactly `size` bytes. `time` is the file's mtime where PostgreSQL wrote it (ns): no record in it is
later. `sysid` is the cluster's system identifier from the segment's first page (0 for history and
backup-history files).

Sealing is deterministic. The header's salt is the suite's MAC of the plaintext under a key of its own
(HKDF of the data subkey, salt = repository id, info ``drsvc/1/wal-salt``), cut to 16 bytes, where other
objects draw it at random. The same file sealed twice (a crash after spooling it and before removing the
incoming copy, or PostgreSQL archiving it again) gives the same bytes, so a site never sees a WAL object
rewritten with other bytes. Different plaintexts get different salts, hence different object keys: no
(key, nonce) pair ever seals two different messages.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import msgpack
import zstandard

from drsvc.core import crypto, format
from drsvc.core.crypto import Keys, ObjectType
from drsvc.core.errors import IntegrityError

META_LEN = struct.Struct(">I")
MAX_META = 4096


@dataclass(frozen=True)
class WalFile:
    source: str
    name: str
    time_ns: int
    sysid: int
    data: bytes


class WalSealer:
    """Seals WAL files of one tenant; thread-safe (a zstd context per thread)."""

    def __init__(self, keys: Keys, level: int) -> None:
        self.keys = keys
        self.level = level
        self._salt_key = keys.suite.hkdf(keys.data_key, keys.repo_id, b"drsvc/1/wal-salt", 32)
        self._local = threading.local()

    def _cctx(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        return c

    def seal(self, source: str, name: str, data: bytes, time_ns: int, sysid: int) -> bytes:
        meta = msgpack.packb(
            {
                "v": format.FORMAT,
                "source": source,
                "name": name,
                "size": len(data),
                "time": time_ns,
                "sysid": sysid,
            }
        )
        plaintext = META_LEN.pack(len(meta)) + meta + format.encode_payload(data, self._cctx())
        salt = self.keys.suite.mac(self._salt_key, plaintext)[:16]
        header = crypto.HEADER.pack(
            crypto.MAGIC, crypto.FORMAT_VERSION, self.keys.suite.ident, int(ObjectType.WAL), 0, salt
        )
        aead = self.keys.object_key(salt)
        return header + aead.encrypt(crypto.counter_nonce(0), plaintext, header + name.encode())


def open_wal(keys: Keys, source: str, name: str, sealed: bytes, dctx: zstandard.ZstdDecompressor) -> WalFile:
    """Verify and decode a WAL object fetched as `name` of `source`; IntegrityError if it is not that."""
    plain = crypto.open_object(keys, ObjectType.WAL, name, sealed)
    try:
        (n,) = META_LEN.unpack_from(plain)
        if n > MAX_META or len(plain) < META_LEN.size + n:
            raise ValueError("meta length out of range")
        meta = msgpack.unpackb(plain[META_LEN.size : META_LEN.size + n])
        if meta.get("v") != format.FORMAT:
            raise ValueError(f"unsupported WAL object version {meta.get('v')}")
        size, time_ns, sysid = int(meta["size"]), int(meta["time"]), int(meta["sysid"])
        meta_source, meta_name = meta["source"], meta["name"]
    except (ValueError, TypeError, KeyError, AttributeError, struct.error, msgpack.UnpackException) as exc:
        raise IntegrityError(f"malformed WAL object: {exc}", object=name) from None
    if meta_name != name or meta_source != source:
        raise IntegrityError(
            f"WAL object holds {meta_name!r} of source {meta_source!r}, not {name!r} of {source!r}",
            object=name,
        )
    data = format.decode_payload(plain[META_LEN.size + n :], size, dctx, name)
    return WalFile(source, name, time_ns, sysid, data)
