"""Packing sealed blobs into pack objects, streamed straight into the spool.

Each worker thread owns one open data pack (no locks on the hot path); tree blobs, small and few, share one
pack under a lock, so a snapshot makes as few packs as it can. Every sealed blob goes to the pack's spool
file as soon as it is sealed: no pack is held in memory. A full pack is finished (sealed header, trailer),
fsync'd, renamed into the spool and put in the outbox for the source's sites. The index entries of every
spooled pack are collected for the snapshot's index objects.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import zstandard

from drsvc.core.crypto import BlobType, Keys
from drsvc.core.format import PackIndex, PackWriter, encode_payload
from drsvc.core.layout import Handle, Kind, Layout
from drsvc.core.repository import new_id
from drsvc.core.spool import Spool, SpoolWriter


@dataclass
class _OpenPack:
    writer: PackWriter
    file: SpoolWriter


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
        self._open: list[_OpenPack] = []
        self._lock = threading.Lock()
        self._tree: _OpenPack | None = None
        self._tree_lock = threading.Lock()
        self.packs: list[PackIndex] = []
        self.bytes_written = 0
        self.blobs_written = 0

    def _cctx(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        return c

    def _new_pack(self) -> _OpenPack:
        name = new_id()
        file = self.spool.begin(self.layout.key(Handle(Kind.PACK, name)))
        pack = _OpenPack(PackWriter(self.keys, name, sink=file.write), file)
        with self._lock:
            self._open.append(pack)
        return pack

    def add(self, btype: BlobType, blob_id: bytes, data: bytes | memoryview) -> None:
        """Compress, seal and pack one blob (call from a worker thread)."""
        payload = encode_payload(data, self._cctx())
        pack: _OpenPack | None
        if btype is BlobType.TREE:
            with self._tree_lock:
                if self._tree is None:
                    self._tree = self._new_pack()
                pack = self._tree
                pack.writer.add(btype, blob_id, payload, len(data))
                if pack.writer.size < self.pack_size:
                    return
                self._tree = None
        else:
            pack = getattr(self._local, "pack", None)
            if pack is None:
                pack = self._local.pack = self._new_pack()
            assert pack is not None
            pack.writer.add(btype, blob_id, payload, len(data))
            if pack.writer.size < self.pack_size:
                return
            self._local.pack = None
        self._finish(pack)

    def _finish(self, pack: _OpenPack) -> None:
        with self._lock:
            self._open.remove(pack)
        w = pack.writer
        w.finish()
        pack.file.commit(self.layout.tenant, self.sites)
        with self._lock:
            self.packs.append(PackIndex(w.name, w.cipher.salt, tuple(w.entries)))
            self.bytes_written += w.size
            self.blobs_written += len(w.entries)

    def flush(self) -> None:
        """Spool every open pack (call when no worker is adding any more)."""
        with self._lock:
            still_open = list(self._open)
        for pack in still_open:
            if pack.writer.entries:
                self._finish(pack)
            else:
                with self._lock:
                    self._open.remove(pack)
                pack.file.abort()
        self._local = threading.local()
        self._tree = None

    def abort(self) -> None:
        """Drop every unfinished pack file (a failed or cancelled snapshot)."""
        with self._lock:
            still_open, self._open = self._open, []
        for pack in still_open:
            pack.file.abort()
