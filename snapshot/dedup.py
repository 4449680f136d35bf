"""The tenant's dedup index: which blobs the repository already holds at every site of a source.

A blob may be reused only if its pack is at (or bound for) every site of the source, or the snapshot would
be incomplete at a site that lacks it. Index objects are barriers in the outbox, so an index at a site
proves its packs are there. The set is therefore built from:
1. the index objects listed at every reachable site of the source (an intersection), fetched once and
   cached locally as sealed bytes;
2. index objects still in this host's outbox whose target sites include all of the source's sites.

Blobs in packs that a prune marker condemns are left out: such a pack is deleted once its grace period has
passed, so a snapshot must store those blobs again rather than reference them (drsvc/prune.py).

``IndexCache`` keeps a loaded index between one daemon's snapshots (per tenant and set of sites) and adds
each snapshot's new blobs to it, so a watched snapshot lists no index at the sites. It is used again only:
- if the prune markers listed at every site now (a cheap listing of ``<tenant>/prune/``) are ones it has
  seen, and it saw them less than ``max_age`` ago (a marker can come and go between two listings only
  after its grace period: keep ``max_age`` below it). A new marker or an unreachable site reloads it;
- if its last snapshot succeeded (a failed one may have claimed blobs it never stored): ``take`` hands it
  out, ``keep`` puts it back;
- while it holds at most ``max_ids`` ids (about 120 bytes each).
It also says which snapshot of a source it covers: every blob that snapshot references is in it, so the
next snapshot may reuse that snapshot's subtrees without checking them (``snapshot.tree.Incremental``).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
        self.markers: frozenset[str] = frozenset()  # the prune markers seen when it was loaded

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
        markers = await repo.prune_markers(sites)
        for marker in markers:
            condemned.update(marker.packs)
        index.markers = frozenset(m.id for m in markers)
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


MAX_CACHED_IDS = 2_000_000  # ~250 MB of Python set; a larger index is loaded for each snapshot
MAX_AGE = 600.0  # seconds between two listings of the prune markers before a reload (grace is a day)


@dataclass
class CachedIndex:
    index: DedupIndex
    checked: float  # monotonic time of the last listing of the prune markers
    covers: dict[str, str] = field(default_factory=dict)  # source -> a snapshot whose blobs are all in it
    reused: bool = False  # handed out again (not loaded for this snapshot)


class IndexCache:
    """The dedup indexes a daemon keeps between snapshots (see the module docstring)."""

    def __init__(self, max_ids: int = MAX_CACHED_IDS, max_age: float = MAX_AGE) -> None:
        self.max_ids = max_ids
        self.max_age = max_age
        self._held: dict[tuple[str, tuple[str, ...]], CachedIndex] = {}

    @staticmethod
    def _key(repo: Repository, sites: Sequence[ReadStore]) -> tuple[str, tuple[str, ...]]:
        return repo.tenant, tuple(sorted(s.name for s in sites))

    async def take(self, repo: Repository, sites: Sequence[ReadStore]) -> CachedIndex | None:
        """The cached index for `sites`, if still valid; it is out of the cache until ``keep``."""
        held = self._held.pop(self._key(repo, sites), None)
        if held is None or time.monotonic() - held.checked > self.max_age:
            return None
        checked = time.monotonic()
        names: set[str] = set()
        for store in sites:
            try:
                names.update(h.name for h in await repo.list_handles(Kind.PRUNE, store=store))
            except StoreError:
                return None
        if not names <= held.index.markers:  # prune condemned packs since: some ids may be going
            return None
        held.checked, held.reused = checked, True
        return held

    def keep(
        self, repo: Repository, sites: Sequence[ReadStore], held: CachedIndex, source: str, snapshot_id: str
    ) -> None:
        """After a successful snapshot of `source` whose new blobs are in ``held.index``."""
        if len(held.index) > self.max_ids:
            return
        held.covers[source] = snapshot_id
        held.reused = False
        self._held[self._key(repo, sites)] = held

    def clear(self) -> None:
        self._held.clear()


def _write_cache(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
