"""The tenant's dedup index: which blobs the repository already holds at every site of a source.

A blob may be reused only if its pack is at (or bound for) every site of the source, or the snapshot would
be incomplete at a site that lacks it. Index objects are barriers in the outbox, so an index at a site
proves its packs are there. The set is therefore built from:
1. the index objects listed at every reachable site of the source (an intersection), fetched once and
   cached locally as sealed bytes;
2. index objects still in this host's outbox whose target sites include all of the source's sites.

Blobs in packs that a prune marker condemns are left out: such a pack is deleted once its grace period has
passed, so a snapshot must store those blobs again rather than reference them (drsvc/prune.py).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Sequence
from pathlib import Path

from drsvc.core.errors import ObjectNotFound, StoreError
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import Repository, gather_limited
from drsvc.core.spool import Spool
from drsvc.core.stores import ReadStore


class DedupIndex:
    def __init__(self) -> None:
        self._known: set[bytes] = set()
        self._lock = threading.Lock()

    def claim(self, blob_id: bytes) -> bool:
        """True if the caller must store the blob (first sight); False if it is already stored or claimed."""
        with self._lock:
            if blob_id in self._known:
                return False
            self._known.add(blob_id)
            return True

    def frozen(self) -> frozenset[bytes]:
        with self._lock:
            return frozenset(self._known)

    def __contains__(self, blob_id: bytes) -> bool:
        return blob_id in self._known

    def __len__(self) -> int:
        return len(self._known)

    def add_all(self, ids: Sequence[bytes]) -> None:
        with self._lock:
            self._known.update(ids)

    @classmethod
    async def load(
        cls, repo: Repository, sites: Sequence[ReadStore], spool: Spool, cache_dir: Path
    ) -> tuple[DedupIndex, list[str]]:
        """The index for a source writing to `sites`; also returns warnings (unreachable sites)."""
        index = cls()
        warnings: list[str] = []
        listed: list[set[str]] = []
        for store in sites:
            try:
                listed.append({h.name for h in await repo.list_handles(Kind.INDEX, store=store)})
            except StoreError as exc:  # an unreachable site counts as holding nothing
                listed.append(set())
                warnings.append(f"site {store.name} unreachable while loading the index: {exc.message}")
        common = set.intersection(*listed) if listed else set()
        condemned: set[str] = set()
        for marker in await repo.prune_markers(sites):
            condemned.update(marker.packs)
        await asyncio.to_thread(cache_dir.mkdir, parents=True, exist_ok=True)
        site_names = {s.name for s in sites}

        async def from_site(name: str) -> None:
            cached = cache_dir / name
            if cached.exists():
                data = await asyncio.to_thread(cached.read_bytes)
            else:
                data = await repo.fetch(Handle(Kind.INDEX, name), lambda b: b, stores=sites)
                await asyncio.to_thread(_write_cache, cached, data)
            packs = await asyncio.to_thread(repo.decode_index, name, data)
            for p in packs:
                if p.pack not in condemned:
                    index.add_all([b.blob_id for b in p.blobs])

        await gather_limited(16, [functools.partial(from_site, n) for n in sorted(common)])
        for key, targets in await asyncio.to_thread(
            spool.outbox.keys, repo.tenant, repo.layout.prefix(Kind.INDEX)
        ):
            name = repo.layout.parse(key).name
            if name in common or not site_names <= set(targets):
                continue
            try:
                data = await asyncio.to_thread(spool.read, key)
            except ObjectNotFound:  # shipped everywhere meanwhile: its blobs are simply stored again
                continue
            for p in await asyncio.to_thread(repo.decode_index, name, data):
                index.add_all([b.blob_id for b in p.blobs])
        return index, warnings


def _write_cache(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
