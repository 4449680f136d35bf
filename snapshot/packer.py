"""Packing sealed blobs into pack objects and spooling them.

Each worker thread owns one open pack (no locks on the hot path); a full pack is sealed, written to the spool
(fsync) and recorded in the outbox for the source's sites. The index entries of every spooled pack are
collected for the snapshot's index objects.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import zstandard

from drsvc.core.crypto import BlobType, Keys
from drsvc.core.format import PackIndex, PackWriter, encode_payload
from drsvc.core.layout import Handle, Kind, Layout
from drsvc.core.repository import new_id
from drsvc.core.spool import Spool


class Packer:
    def __init__(
        self, keys: Keys, layout: Layout, spool: Spool, sites: Sequence[str], pack_size: int, level: int
    ) -> None:
        self.keys = keys
        self.layout = layout
        self.spool = spool
        self.sites = list(sites)
        self.pack_size = pack_size
        self.level = level
        self._local = threading.local()
        self._open: list[PackWriter] = []
        self._lock = threading.Lock()
        self.packs: list[PackIndex] = []
        self.bytes_written = 0
        self.blobs_written = 0

    def _cctx(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        return c

    def _writer(self, btype: BlobType) -> PackWriter:
        attr = f"w{int(btype)}"
        w: PackWriter | None = getattr(self._local, attr, None)
        if w is None:
            w = PackWriter(self.keys, new_id())
            setattr(self._local, attr, w)
            with self._lock:
                self._open.append(w)
        return w

    def add(self, btype: BlobType, blob_id: bytes, data: bytes | memoryview) -> None:
        """Compress, seal and pack one blob (call from a worker thread)."""
        payload = encode_payload(data, self._cctx())
        w = self._writer(btype)
        w.add(btype, blob_id, payload, len(data))
        if w.size >= self.pack_size:
            setattr(self._local, f"w{int(btype)}", None)
            with self._lock:
                self._open.remove(w)
            self._spool(w)

    def _spool(self, w: PackWriter) -> None:
        data = w.finish()
        self.spool.put(self.layout.key(Handle(Kind.PACK, w.name)), data, self.layout.tenant, self.sites)
        with self._lock:
            self.packs.append(PackIndex(w.name, w.cipher.salt, tuple(w.entries)))
            self.bytes_written += len(data)
            self.blobs_written += len(w.entries)

    def flush(self) -> None:
        """Spool every open pack (call when no worker is adding any more)."""
        with self._lock:
            open_writers, self._open = self._open, []
        for w in open_writers:
            if w.entries:
                self._spool(w)
        self._local = threading.local()
