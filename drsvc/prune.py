"""Prune: delete what no snapshot record references, at every site of a tenant, while writers keep writing.

A run (``prune_tenant``):
1. Lists every site of the tenant. All must answer: a deletion has to reach every replica (MLPS), so with a
   site down prune changes nothing and names the site.
2. Reads the snapshot records (the union over the sites) and the prune markers, and streams the index
   objects into compact arrays: a 16-byte id prefix, a pack number and a length per blob (24 bytes a blob),
   plus the locations of tree blobs (one per directory, few).
3. Walks the trees of every record, level by level, reading the trees of one pack in few ranged reads, and
   collects the ids of every blob they reach (deduplicated as they grow).
4. Accounts every pack. A pack with no used blob is condemned. A pack whose unused share exceeds
   ``repack_waste`` has its used blobs copied into new packs (sealed once, written to every site holding the
   old pack, then a new index) and is condemned too. A pack at a site that no index names (a crashed
   writer's, or one still being shipped) is condemned like an unused one, unless this host's outbox holds it.
5. Sweeps: a pack condemned at least ``grace`` ago is deleted, unless a record written since needs it again
   (it is then taken back). Every index naming it is first replaced by one without it (at the sites holding
   the old index), then the old indexes go, then the pack, at every site. Records still in this host's
   outbox postpone the sweep.
6. Writes one new marker with what stays condemned, then deletes the markers it read.

Why concurrent writers are safe: a writer reads the prune markers before the index and never deduplicates
against a condemned pack's blobs (snapshot/dedup.py). Only a writer that read the index before a marker was
written can reference a condemned pack; it must finish within ``grace``, and its record is then seen by the
sweep, which takes the pack back. A locked object (object lock) is not deleted before its retention ends: it
stays condemned, is reported, and a later run deletes it.

With ``grace = 0`` condemned packs are deleted in the same run: only for a repository that nobody writes to
during the prune (restic's exclusive-lock semantics; benchmarks use it to compare like with like).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from drsvc.app import App
from drsvc.core import crypto, format
from drsvc.core.crypto import BlobType, ObjectType, PackCipher
from drsvc.core.errors import (
    IntegrityError,
    ObjectLocked,
    RepositoryError,
    StoreError,
    TransientStoreError,
)
from drsvc.core.format import BlobEntry, PackIndex, PackWriter
from drsvc.core.layout import Handle, Kind
from drsvc.core.outbox import Outbox
from drsvc.core.repository import BlobLocation, Repository, dctx, gather_limited, new_id
from drsvc.core.stores import ObjectStore
from drsvc.memory import lazy_module, release_free_memory

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
else:
    # Loaded on first use, after the repository is open: unwrapping its key from a passphrase takes scrypt's
    # 32 MiB for a moment, and numpy's 10 MiB need not sit under that peak (benchmarks/prune.py, history case)
    np = lazy_module("numpy")

log = logging.getLogger("drsvc.prune")

ID = 16  # bytes of a blob id kept as its identity here: 128 bits, like a UUID
_IDS = f"S{ID}"  # numpy's dtype: ID raw bytes
SPAN_GAP = 1024 * 1024  # tree reads: join ranges of one pack closer than this ...
SPAN_MAX = 2 * 1024 * 1024  # ... into reads of at most this (READS_AT_ONCE of them in flight)
NS = 1_000_000_000
READS_AT_ONCE = 8  # tree reads in flight during the walk: at most 16 MiB of spans
INDEXES_AT_ONCE = 2  # index objects decoded at once (each up to ~100,000 entries as Python lists)
USED_BUFFER = 16 * 1024 * 1024  # used ids collected before they are merged into the sorted array
STARTED = 0  # a marker's time for a pack whose deletion has begun (object lock kept a copy): due at once


@dataclass
class Locked:
    site: str
    key: str
    until: str


@dataclass
class PruneReport:
    tenant: str
    sites: list[str]
    dry_run: bool
    grace: float
    snapshots: int = 0
    blobs: int = 0
    packs: int = 0
    pack_bytes: int = 0  # listed bytes of the packs (one replica)
    used_bytes: int = 0  # sealed bytes of the blobs some record reaches
    condemned: list[str] = field(default_factory=list)  # packs condemned by this run
    condemned_bytes: int = 0
    unindexed: int = 0  # of them: packs that no index names
    repacked: list[str] = field(default_factory=list)  # packs whose used blobs were copied
    repack_blobs: int = 0
    repack_bytes: int = 0  # bytes written in new packs (one replica)
    deleted: list[str] = field(default_factory=list)  # packs deleted at every site holding them
    deleted_bytes: int = 0  # one replica
    deleted_objects: int = 0  # objects deleted, counting every replica (packs, indexes, markers)
    indexes_rewritten: int = 0
    resurrected: list[str] = field(default_factory=list)
    waiting: int = 0  # packs still condemned after this run, waiting for their grace period
    next_sweep_ns: int | None = None
    locked: list[Locked] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("condemned", "repacked", "deleted", "resurrected"):
            d[k] = len(d[k])
        d["locked"] = [x.__dict__ for x in self.locked]
        return d


@dataclass
class _Pack:
    name: str
    salt: bytes = b""
    indexed: bool = False
    indexes: set[str] = field(default_factory=set)
    sites: dict[str, int] = field(default_factory=dict)  # site -> listed size

    @property
    def size(self) -> int:
        return max(self.sites.values(), default=0)


@dataclass
class _Listing:
    packs: dict[str, dict[str, int]] = field(default_factory=dict)  # pack -> site -> size
    indexes: dict[str, list[str]] = field(default_factory=dict)  # index -> sites
    snapshots: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (tag, id) -> sites
    markers: dict[str, list[str]] = field(default_factory=dict)  # marker -> sites


@dataclass
class _IndexPart:
    name: str
    packs: list[tuple[str, bytes, bytes, list[int], list[tuple[bytes, BlobEntry]]]]


class _Blobs:
    """Every indexed blob as three parallel arrays, built index by index."""

    def __init__(self) -> None:
        self._ids: list[npt.NDArray[Any]] = []
        self._pack: list[npt.NDArray[np.uint32]] = []
        self._len: list[npt.NDArray[np.uint32]] = []
        self.ids: npt.NDArray[Any] = np.empty(0, _IDS)
        self.pack: npt.NDArray[np.uint32] = np.empty(0, np.uint32)
        self.length: npt.NDArray[np.uint32] = np.empty(0, np.uint32)

    def add(self, pack_no: int, ids: bytes, lengths: list[int]) -> None:
        self._ids.append(np.frombuffer(ids, dtype=_IDS))
        self._pack.append(np.full(len(lengths), pack_no, dtype=np.uint32))
        self._len.append(np.asarray(lengths, dtype=np.uint32))

    def freeze(self) -> None:
        if self._ids:
            self.ids = np.concatenate(self._ids)
            self.pack = np.concatenate(self._pack)
            self.length = np.concatenate(self._len)
        self._ids, self._pack, self._len = [], [], []


class _Used:
    """The ids the records reach: 16-byte prefixes, sorted and deduplicated whenever the buffer grows."""

    def __init__(self) -> None:
        self._buf: list[bytes] = []
        self._size = 0
        self.ids: npt.NDArray[Any] = np.empty(0, _IDS)

    def add(self, joined: bytes) -> None:
        self._buf.append(joined)
        self._size += len(joined)
        if self._size > USED_BUFFER:
            self.compact()

    def compact(self) -> None:
        if self._buf:
            fresh = np.frombuffer(b"".join(self._buf), dtype=_IDS)
            self.ids = np.unique(np.concatenate([self.ids, fresh]))
            self._buf, self._size = [], 0

    def contains(self, ids: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        self.compact()
        if not len(self.ids):
            return np.zeros(len(ids), dtype=bool)
        pos = np.searchsorted(self.ids, ids)
        pos[pos == len(self.ids)] = 0
        return np.asarray(self.ids[pos] == ids)


def due_now(condemned: dict[str, int], grace: float, now_ns: int) -> dict[str, int]:
    """The condemned packs whose grace period has passed. In integers: ``t + 0.0`` as a float rounds a
    nanosecond time to a multiple of 256 ns, upwards half the time, and ``--grace 0`` would then wait."""
    wait = int(grace * NS)
    return {n: t for n, t in condemned.items() if t + wait <= now_ns}


def id_set(ids: npt.NDArray[Any]) -> frozenset[bytes]:
    """The ids of an array as Python bytes, each exactly ID bytes long. Not ``bytes(x)`` per element: numpy
    drops the trailing zero bytes of an ``S16`` element, so an id ending in 0x00 would never match."""
    raw = np.ascontiguousarray(ids).tobytes()
    return frozenset(raw[i : i + ID] for i in range(0, len(raw), ID))


def _tree_refs(
    repo: Repository, spans: list[tuple[bytes, BlobLocation]], base: int, data: bytes
) -> list[tuple[bytes, list[bytes], bytes]]:
    """Open the trees in `data` (a ranged read starting at pack offset `base`): for each, its subtrees and
    the joined id prefixes of everything it references."""
    out = []
    mv = memoryview(data)
    for tid, loc in spans:
        start = loc.entry.offset - base
        raw = repo.open_blob(loc, mv[start : start + loc.entry.length], tid)
        subtrees, chunks = format.tree_refs(raw, f"tree {tid.hex()}")
        joined = b"".join(c[:ID] for c in chunks) + b"".join(s[:ID] for s in subtrees)
        out.append((tid, subtrees, joined))
    return out


def _decode_index(repo: Repository, name: str, data: bytes) -> _IndexPart:
    part = _IndexPart(name, [])
    plain = crypto.open_object(repo.keys, ObjectType.INDEX, name, data)
    for pack, salt, wire in format.index_wire(plain, name):
        ids = b"".join(w[1][:ID] for w in wire)
        trees = [
            (w[1], BlobEntry(BlobType.TREE, w[1], w[2], w[3], w[4])) for w in wire if w[0] == BlobType.TREE
        ]
        part.packs.append((pack, salt, ids, [w[3] for w in wire], trees))
    return part


def _used_blobs(
    repo: Repository, name: str, data: bytes, wanted: frozenset[bytes]
) -> list[tuple[BlobType, bytes, bytes, int]]:
    """The verified payloads (codec byte + data, as sealed) of the blobs of pack `name` whose id prefix is
    in `wanted`, read from the whole pack; the pack's sealed header says where they are."""
    salt, entries = format.read_pack_header(repo.keys, name, data)
    cipher = PackCipher(repo.keys, salt)
    mv = memoryview(data)
    out = []
    for e in entries:
        if e.blob_id[:ID] not in wanted:
            continue
        where = f"data/{name}"
        payload = cipher.open_blob(e.btype, e.blob_id, mv[e.offset : e.offset + e.length], where)
        plain = format.decode_payload(payload, e.raw_length, dctx(), where)
        if repo.content_id(plain) != e.blob_id:
            raise IntegrityError("blob content does not match its id", object=where, blob=e.blob_id.hex())
        out.append((e.btype, e.blob_id, payload, e.raw_length))
    return out


def _pending(app: App, tenant: str) -> set[str]:
    """Keys of `tenant` that this host's outbox has not shipped everywhere yet (read-only if the daemon owns
    the state)."""
    spool = app.open_spool
    if spool is not None:
        return {k for k, _ in spool.outbox.keys(tenant)}
    path = app.config.state.dir / "outbox.db"
    if not path.exists():
        return set()
    outbox = Outbox.open_readonly(path)
    try:
        return {k for k, _ in outbox.keys(tenant)}
    finally:
        outbox.close()


class _Run:
    def __init__(
        self,
        app: App,
        repo: Repository,
        stores: dict[str, ObjectStore],
        report: PruneReport,
        repack_waste: float,
        now_ns: int,
        progress: Callable[[str], None] | None,
    ) -> None:
        self.app = app
        self.repo = repo
        self.layout = repo.layout
        self.stores = stores
        self.report = report
        self.repack_waste = repack_waste
        self.now_ns = now_ns
        self.progress = progress or (lambda _: None)
        self.listing = _Listing()
        self.packs: list[_Pack] = []
        self.pack_no: dict[str, int] = {}
        self.blobs = _Blobs()
        self.trees: dict[bytes, BlobLocation] = {}
        self.used = _Used()

    # -- 1. listing ------------------------------------------------------------------------------
    async def list_sites(self) -> None:
        async def one(site: str) -> None:
            store = self.stores[site]
            async for info in store.list(self.layout.root):
                if info.key.rsplit("/", 1)[-1].startswith("."):
                    continue
                try:
                    h = self.layout.parse(info.key)
                except RepositoryError:
                    continue  # not ours: check and scrub report strays, prune leaves them alone
                if h.kind is Kind.PACK:
                    self.listing.packs.setdefault(h.name, {})[site] = info.size
                elif h.kind is Kind.INDEX:
                    self.listing.indexes.setdefault(h.name, []).append(site)
                elif h.kind is Kind.SNAPSHOT:
                    self.listing.snapshots.setdefault((h.source_tag, h.name), []).append(site)
                elif h.kind is Kind.PRUNE:
                    self.listing.markers.setdefault(h.name, []).append(site)

        results = await asyncio.gather(*(one(s) for s in self.stores), return_exceptions=True)
        down = [
            f"{site}: {getattr(r, 'message', r)}"
            for site, r in zip(self.stores, results, strict=True)
            if isinstance(r, BaseException)
        ]
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, StoreError):
                raise r
        if down:
            raise TransientStoreError(
                "prune needs every site of the tenant, and some could not be listed: " + "; ".join(down),
                tenant=self.repo.tenant,
                hint="nothing was deleted; run prune again once the sites are back",
            )

    def _holders(self, sites: Iterable[str]) -> list[ObjectStore]:
        return [self.stores[s] for s in sites]

    # -- 2. records, markers, index ----------------------------------------------------------------
    async def read_records(self) -> list[format.SnapshotRecord]:
        async def one(tag: str, name: str, sites: list[str]) -> format.SnapshotRecord:
            return await self.repo.fetch(
                Handle(Kind.SNAPSHOT, name, tag),
                lambda b: self.repo.decode_snapshot(name, b),
                stores=self._holders(sites),
            )

        calls = [functools.partial(one, t, n, s) for (t, n), s in sorted(self.listing.snapshots.items())]
        return await gather_limited(16, calls)

    async def read_markers(self) -> dict[str, int]:
        markers = await self.repo.prune_markers(list(self.stores.values()))
        condemned: dict[str, int] = {}
        for m in markers:
            for pack, t in m.packs.items():
                condemned[pack] = min(t, condemned.get(pack, t))
        return condemned

    def _pack(self, name: str) -> int:
        no = self.pack_no.get(name)
        if no is None:
            no = self.pack_no[name] = len(self.packs)
            self.packs.append(_Pack(name))
        return no

    async def read_indexes(self) -> None:
        async def one(name: str) -> None:
            part = await self.repo.fetch(
                Handle(Kind.INDEX, name),
                functools.partial(_decode_index, self.repo, name),
                stores=self._holders(self.listing.indexes[name]),
            )
            for pack, salt, ids, lengths, trees in part.packs:
                info = self.packs[self._pack(pack)]
                info.indexes.add(name)
                if info.indexed:  # the same pack in two indexes (e.g. an index rewrite interrupted)
                    continue
                info.indexed, info.salt = True, salt
                self.blobs.add(self.pack_no[pack], ids, lengths)
                for blob_id, entry in trees:
                    self.trees[blob_id] = BlobLocation(pack, salt, entry)

        # an index object holds up to ~100,000 entries, decoded into lists: a few at a time bound the memory
        await gather_limited(
            INDEXES_AT_ONCE, [functools.partial(one, n) for n in sorted(self.listing.indexes)]
        )
        for pack, sites in self.listing.packs.items():
            self.packs[self._pack(pack)].sites = sites
        self.blobs.freeze()

    # -- 3. the walk ------------------------------------------------------------------------------
    async def walk(self, records: list[format.SnapshotRecord]) -> None:
        seen: set[bytes] = set()
        roots: dict[bytes, str] = {}
        for r in records:
            roots.setdefault(r.tree, r.id)
        level = list(roots)
        while level:
            todo = [t for t in dict.fromkeys(level) if t not in seen]
            seen.update(todo)
            level = []
            by_pack: dict[str, list[tuple[bytes, BlobLocation]]] = {}
            for tid in todo:
                loc = self.trees.get(tid)
                if loc is None:
                    what = f"snapshot {roots[tid]}" if tid in roots else "a snapshot"
                    raise IntegrityError(
                        f"tree {tid.hex()[:16]} of {what} is in no index: prune cannot tell what is used",
                        tenant=self.repo.tenant,
                        hint="nothing was deleted; run `drsvc check` and `drsvc scrub`",
                    )
                by_pack.setdefault(loc.pack, []).append((tid, loc))
            calls = []
            for pack, locs in by_pack.items():
                locs.sort(key=lambda x: x[1].entry.offset)
                span: list[tuple[bytes, BlobLocation]] = []
                for item in locs:
                    e = item[1].entry
                    if span:
                        first = span[0][1].entry
                        last = span[-1][1].entry
                        if (
                            e.offset - (last.offset + last.length) > SPAN_GAP
                            or e.offset + e.length - first.offset > SPAN_MAX
                        ):
                            calls.append(functools.partial(self._read_span, pack, span))
                            span = []
                    span.append(item)
                if span:
                    calls.append(functools.partial(self._read_span, pack, span))
            for refs in await gather_limited(READS_AT_ONCE, calls):
                for tid, subtrees, joined in refs:
                    self.used.add(tid[:ID] + joined)
                    level.extend(subtrees)
            self.progress(f"walked {len(seen)} trees")
        self.used.compact()

    async def _read_span(
        self, pack: str, span: list[tuple[bytes, BlobLocation]]
    ) -> list[tuple[bytes, list[bytes], bytes]]:
        base = span[0][1].entry.offset
        end = span[-1][1].entry.offset + span[-1][1].entry.length
        sites = self.listing.packs.get(pack, {})
        return await self.repo.fetch(
            Handle(Kind.PACK, pack),
            functools.partial(_tree_refs, self.repo, span, base),
            base,
            end - base,
            stores=self._holders(sites) or None,
        )

    # -- 4. accounting ----------------------------------------------------------------------------
    def account(self) -> tuple[npt.NDArray[np.bool_], npt.NDArray[Any], npt.NDArray[Any]]:
        b = self.blobs
        in_used = self.used.contains(b.ids)
        n = len(self.packs)
        total = np.bincount(b.pack, weights=b.length, minlength=n)
        used = np.bincount(b.pack, weights=np.where(in_used, b.length, 0), minlength=n)
        return in_used, total, used

    def still_needed(self, in_used: npt.NDArray[np.bool_], condemned: set[int]) -> set[int]:
        """Condemned packs holding a used blob that no other (kept) pack holds."""
        if not condemned:
            return set()
        b = self.blobs
        cmask = np.zeros(len(self.packs), dtype=bool)
        cmask[list(condemned)] = True
        in_condemned = cmask[b.pack]
        covered = np.unique(b.ids[in_used & ~in_condemned])
        need = in_used & in_condemned & ~np.isin(b.ids, covered)
        return {int(p) for p in np.unique(b.pack[need])}

    # -- repack -------------------------------------------------------------------------------------
    async def repack(self, packs: list[int], in_used: npt.NDArray[np.bool_]) -> None:
        """Copy the used blobs of `packs` into new packs at the sites holding each, then index them."""
        groups: dict[frozenset[str], list[int]] = {}
        for no in packs:
            groups.setdefault(frozenset(self.packs[no].sites), []).append(no)
        written: set[bytes] = set()
        for sites, members in groups.items():
            await self._repack_group(self._holders(sorted(sites)), members, in_used, written)

    async def _repack_group(
        self,
        holders: list[ObjectStore],
        members: list[int],
        in_used: npt.NDArray[np.bool_],
        written: set[bytes],
    ) -> None:
        new_packs: list[PackIndex] = []
        writers = [PackWriter(self.repo.keys, new_id())]
        for no in members:
            p = self.packs[no]
            wanted = id_set(self.blobs.ids[(self.blobs.pack == no) & in_used])
            blobs = await self.repo.fetch(
                Handle(Kind.PACK, p.name),
                functools.partial(_used_blobs, self.repo, p.name, wanted=wanted),
                stores=self._holders(p.sites),
            )
            # one thread hop per pack, not per blob: sealing is quick, the hop is not
            full = await asyncio.to_thread(self._append, writers, blobs, written)
            for w in full:
                new_packs.append(await self._put_pack(holders, w))
            self.report.repacked.append(p.name)
            self.progress(f"repacked {p.name[:16]}")
        if writers[-1].entries:
            new_packs.append(await self._put_pack(holders, writers[-1]))
        if new_packs:  # the index after its packs, as a writer does: an index at a site proves its packs
            await self._put_index(holders, new_packs)

    def _append(
        self,
        writers: list[PackWriter],
        blobs: list[tuple[BlobType, bytes, bytes, int]],
        written: set[bytes],
    ) -> list[PackWriter]:
        """Seal `blobs` into the open pack (``writers[-1]``), opening new ones as packs fill; returns the
        packs that filled up (blocking: runs in a thread)."""
        full = []
        for btype, blob_id, payload, raw_length in blobs:
            if blob_id in written:
                continue
            written.add(blob_id)
            writers[-1].add(btype, blob_id, payload, raw_length)
            self.report.repack_blobs += 1
            if writers[-1].size >= self.repo.params.pack_size:
                full.append(writers[-1])
                writers.append(PackWriter(self.repo.keys, new_id()))
        del writers[:-1]
        return full

    async def _put_pack(self, holders: list[ObjectStore], writer: PackWriter) -> PackIndex:
        data = await asyncio.to_thread(writer.finish)
        key = self.layout.key(Handle(Kind.PACK, writer.name))
        await asyncio.gather(*(s.put(key, data) for s in holders))
        self.report.repack_bytes += len(data)
        return PackIndex(writer.name, writer.cipher.salt, tuple(writer.entries))

    async def _put_index(self, holders: list[ObjectStore], packs: list[PackIndex]) -> None:
        name = new_id()
        sealed = await asyncio.to_thread(
            crypto.seal_object, self.repo.keys, ObjectType.INDEX, name, format.encode_index(packs)
        )
        key = self.layout.key(Handle(Kind.INDEX, name))
        await asyncio.gather(*(s.put(key, sealed) for s in holders))

    # -- 5. sweep ---------------------------------------------------------------------------------
    async def sweep(self, doomed: dict[str, int]) -> dict[str, int]:
        """Delete the `doomed` packs everywhere; returns those that must stay condemned (locked)."""
        carry: dict[str, int] = {}
        affected: dict[str, list[str]] = {}
        for name in doomed:
            no = self.pack_no.get(name)
            if no is not None:
                for idx in self.packs[no].indexes:
                    affected.setdefault(idx, []).append(name)

        # replace each index naming a doomed pack by one without it, then delete the old ones
        async def rewrite(idx: str) -> None:
            sites = self.listing.indexes[idx]
            holders = self._holders(sites)
            packs = await self.repo.fetch(
                Handle(Kind.INDEX, idx), lambda b: self.repo.decode_index(idx, b), stores=holders
            )
            keep = [p for p in packs if p.pack not in doomed]
            if keep:
                await self._put_index(holders, keep)
            self.report.indexes_rewritten += 1

        await gather_limited(INDEXES_AT_ONCE, [functools.partial(rewrite, idx) for idx in sorted(affected)])
        for idx in sorted(affected):
            for site in self.listing.indexes[idx]:
                if not await self._delete(site, self.layout.key(Handle(Kind.INDEX, idx))):
                    for name in affected[idx]:  # a locked index still names them: they stay for now
                        carry[name] = STARTED

        calls = []
        for name in doomed:
            if name in carry:
                continue
            for site in self.listing.packs.get(name, {}):
                calls.append(functools.partial(self._delete_pack, site, name, doomed, carry))
        await gather_limited(16, calls)
        for name in doomed:
            if name not in carry:
                self.report.deleted.append(name)
                self.report.deleted_bytes += max(self.listing.packs.get(name, {}).values(), default=0)
        return carry

    async def _delete_pack(self, site: str, name: str, doomed: dict[str, int], carry: dict[str, int]) -> None:
        if not await self._delete(site, self.layout.key(Handle(Kind.PACK, name))):
            carry[name] = STARTED

    async def _delete(self, site: str, key: str) -> bool:
        """Delete one object at one site; False (and reported) if object lock keeps it."""
        try:
            await self.stores[site].delete(key)
        except ObjectLocked as exc:
            self.report.locked.append(Locked(site, key, str(exc.fields.get("until", ""))))
            return False
        self.report.deleted_objects += 1
        return True

    # -- 6. markers -------------------------------------------------------------------------------
    async def replace_markers(self, condemned: dict[str, int]) -> None:
        if condemned:
            name = new_id()
            marker = format.PruneMarker(name, time.time_ns(), socket.gethostname(), condemned)
            sealed = await asyncio.to_thread(
                crypto.seal_object, self.repo.keys, ObjectType.PRUNE, name, format.encode_prune_marker(marker)
            )
            key = self.layout.key(Handle(Kind.PRUNE, name))
            await asyncio.gather(*(s.put(key, sealed) for s in self.stores.values()))
        for old, sites in sorted(self.listing.markers.items()):
            for site in sites:
                await self._delete(site, self.layout.key(Handle(Kind.PRUNE, old)))


async def prune_tenant(
    app: App,
    tenant: str,
    *,
    grace: float | None = None,
    repack_waste: float | None = None,
    dry_run: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PruneReport:
    """One prune run over every site of `tenant` (see the module docstring)."""
    started = time.monotonic()
    grace = app.config.prune.grace if grace is None else grace
    repack_waste = app.config.prune.repack_waste if repack_waste is None else repack_waste
    site_names = app.config.tenant_sites(tenant)
    report = PruneReport(tenant, site_names, dry_run, grace)
    repo = await app.open_repo(tenant)
    stores = {n: app.store(n) for n in site_names}
    now_ns = time.time_ns()
    run = _Run(app, repo, stores, report, repack_waste, now_ns, progress)

    await run.list_sites()
    pending = await asyncio.to_thread(_pending, app, tenant)
    pending_packs = {k.rsplit("/", 1)[-1] for k in pending if k.startswith(repo.layout.prefix(Kind.PACK))}
    pending_records = any(k.startswith(repo.layout.prefix(Kind.SNAPSHOT)) for k in pending)
    records = await run.read_records()
    condemned_at = await run.read_markers()
    await run.read_indexes()
    release_free_memory()  # the decoded index objects are gone; the sorted arrays stay
    report.snapshots = len(records)
    report.blobs = len(run.blobs.ids)
    await run.walk(records)
    release_free_memory()  # likewise the tree spans (history case: peak PSS 64 -> 59 MiB)

    in_used, total, used = run.account()
    listed = [p for p in run.packs if p.sites]
    report.packs = len(listed)
    report.pack_bytes = sum(p.size for p in listed)
    report.used_bytes = int(used.sum())

    # what earlier runs condemned, unless a record needs it again
    old = {run.pack_no[n] for n in condemned_at if n in run.pack_no and run.packs[run.pack_no[n]].sites}
    back = run.still_needed(in_used, old)
    for no in sorted(back):
        name = run.packs[no].name
        report.resurrected.append(name)
        log.info("pack needed again, no longer condemned", extra={"tenant": tenant, "pack": name})
    condemned = {
        n: t
        for n, t in condemned_at.items()
        if n in run.pack_no and run.pack_no[n] not in back and run.packs[run.pack_no[n]].sites
    }

    # A referenced blob that no index names may sit in a pack no index names (an index lost everywhere; the
    # index is rebuildable from the packs): such packs are then kept.
    unindexed_used = int((~np.isin(run.used.ids, run.blobs.ids)).sum())
    if unindexed_used:
        report.notes.append(
            f"{unindexed_used} blobs that snapshots reference are in no index: packs that no index names are "
            "kept; run `drsvc check` and `drsvc scrub`"
        )

    # newly unused, unindexed or wasteful packs
    to_repack: list[int] = []
    for no, p in enumerate(run.packs):
        if not p.sites or p.name in condemned or p.name in pending_packs:
            continue
        if not p.indexed:
            if unindexed_used:
                continue
            condemned[p.name] = now_ns
            report.unindexed += 1
        elif used[no] == 0:
            condemned[p.name] = now_ns
        elif total[no] and 1 - used[no] / total[no] > repack_waste:
            to_repack.append(no)
            continue
        else:
            continue
        report.condemned.append(p.name)
        report.condemned_bytes += p.size
    if to_repack and not dry_run:
        await run.repack(to_repack, in_used)
        release_free_memory()
    for no in to_repack:
        p = run.packs[no]
        condemned[p.name] = now_ns
        report.condemned.append(p.name)
        report.condemned_bytes += p.size
    if dry_run:
        report.repacked = [run.packs[no].name for no in to_repack]

    # sweep what has waited long enough
    due = due_now(condemned, grace, now_ns)
    if due and pending_records and grace > 0:
        report.notes.append(
            "this host's outbox still holds snapshot records of the tenant: deletion waits for the next run"
        )
        due = {}
    if dry_run:
        report.deleted = sorted(due)
        report.deleted_bytes = sum(run.packs[run.pack_no[n]].size for n in due)
        report.waiting = len(condemned) - len(due)
    else:
        carry = await run.sweep(due)
        stay = {n: t for n, t in condemned.items() if n not in due} | carry
        await run.replace_markers(stay)
        report.waiting = len(stay)
        if stay:
            report.next_sweep_ns = min(stay.values()) + int(grace * NS)
    report.seconds = time.monotonic() - started
    log.info(
        "prune finished",
        extra={
            "tenant": tenant,
            "dry_run": dry_run,
            "condemned": len(report.condemned),
            "repacked": len(report.repacked),
            "deleted": len(report.deleted),
            "deleted_bytes": report.deleted_bytes,
            "locked": len(report.locked),
            "waiting": report.waiting,
        },
    )
    return report
