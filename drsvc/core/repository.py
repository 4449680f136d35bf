"""A tenant repository as read from one or more sites.

1. ``init_repository`` writes the plaintext config and a key slot to a site; the same master key and
   repository id go to every site of the tenant, so each site alone is a complete repository.
2. ``open_repository`` reads the config and key slots from the first site that answers, unlocks the master
   key and checks the config's MAC.
3. Reads go through ``Repository.fetch``: the preferred site first, then the others, for a missing object or
   one that fails verification; every fallback is reported through a callback (and the caller's result).
4. Every blob read is verified: AEAD tag, then the keyed content id of the decompressed plaintext.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import zstandard

from drsvc.core import crypto, format
from drsvc.core.crypto import BlobType, Keys, ObjectType, PackCipher, ScryptParams, Suite
from drsvc.core.errors import (
    CryptoError,
    IntegrityError,
    ObjectNotFound,
    RepositoryError,
    RepositoryNotFound,
    StoreError,
    WrongKeyError,
)
from drsvc.core.format import BlobEntry, PackIndex, SnapshotRecord
from drsvc.core.layout import Handle, Kind, Layout
from drsvc.core.stores import ObjectStore, ReadStore

T = TypeVar("T")
_local = threading.local()


def dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


@dataclass(frozen=True)
class RepoParams:
    """Parameters fixed when a repository is created; they are part of its config."""

    suite: Suite = Suite.AES_256_GCM
    chunk_min: int = 16 * 1024
    chunk_avg: int = 64 * 1024
    chunk_max: int = 256 * 1024
    pack_size: int = 8 * 1024 * 1024
    compression_level: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.suite.value,
            "chunker": {
                "algorithm": "fastcdc2020",
                "min": self.chunk_min,
                "avg": self.chunk_avg,
                "max": self.chunk_max,
            },
            "pack_size": self.pack_size,
            "compression": {"algorithm": "zstd", "level": self.compression_level},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RepoParams:
        ch = d["chunker"]
        return cls(
            Suite(d["suite"]),
            int(ch["min"]),
            int(ch["avg"]),
            int(ch["max"]),
            int(d["pack_size"]),
            int(d["compression"]["level"]),
        )


@dataclass(frozen=True)
class BlobLocation:
    pack: str
    salt: bytes
    entry: BlobEntry


@dataclass
class Fallback:
    """One read that had to leave its preferred site."""

    site: str
    key: str
    error: str


@dataclass
class ReadReport:
    fallbacks: list[Fallback] = field(default_factory=list)
    stray_keys: list[str] = field(default_factory=list)
    bytes_fetched: int = 0
    requests: int = 0


def _config_body(tenant: str, repo_id: bytes, params: RepoParams) -> dict[str, Any]:
    return {
        "format": format.FORMAT,
        "kind": "drsvc-repository",
        "tenant": tenant,
        "id": repo_id.hex(),
        **params.to_json(),
    }


def canonical_config(body: dict[str, Any]) -> bytes:
    """The bytes of a repository config (without its "mac") that its MAC covers."""
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def new_id() -> str:
    """A unique object name: 192 random bits (a random UUID and 8 more random bytes), 48 hex digits."""
    return uuid.uuid4().hex + os.urandom(8).hex()


async def init_repository(
    stores: Sequence[ObjectStore],
    tenant: str,
    kind: str,
    secret: bytes,
    params: RepoParams = RepoParams(),
    scrypt: ScryptParams = ScryptParams(),
    *,
    existing: tuple[Keys, dict[str, Any], list[dict[str, Any]]] | None = None,
) -> Keys:
    """Create the repository on every store. Stores that already hold it must hold the same one."""
    layout = Layout(tenant)
    if existing is None:
        master = crypto.new_master_key()
        repo_id = os.urandom(16)
        keys = Keys(params.suite, repo_id, master)
        body = _config_body(tenant, repo_id, params)
        body["mac"] = keys.config_mac(canonical_config(body))
        slot_id = new_id()[:32]
        slots = [crypto.make_key_slot(params.suite, slot_id, master, kind, secret, scrypt)]
    else:
        keys, body, slots = existing
    config_bytes = json.dumps(body, indent=1, sort_keys=True).encode()
    for store in stores:
        have = await store.stat(layout.key(Handle(Kind.CONFIG)))
        if have is not None:
            other = json.loads(await store.get(layout.key(Handle(Kind.CONFIG))))
            if other.get("id") != body["id"]:
                raise RepositoryError(
                    "the site already holds a different repository for this tenant",
                    site=store.name,
                    tenant=tenant,
                    hint="each tenant has one repository; use `drsvc init` only once per tenant",
                )
        for slot in slots:
            await store.put(layout.key(Handle(Kind.KEY, slot["id"])), json.dumps(slot, indent=1).encode())
        await store.put(layout.key(Handle(Kind.CONFIG)), config_bytes)
    return keys


async def read_config(store: ReadStore, tenant: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    layout = Layout(tenant)
    try:
        raw = await store.get(layout.key(Handle(Kind.CONFIG)))
    except ObjectNotFound:
        raise RepositoryNotFound(
            "no repository for this tenant at the site", site=store.name, tenant=tenant
        ) from None
    try:
        body = json.loads(raw)
        if body.get("kind") != "drsvc-repository":
            raise ValueError("not a drsvc repository config")
        if body.get("format") != format.FORMAT:
            raise ValueError(f"unsupported repository format {body.get('format')}")
    except (ValueError, AttributeError) as exc:
        raise RepositoryError(
            f"unreadable repository config: {exc}", site=store.name, tenant=tenant
        ) from None
    slots = []
    async for info in store.list(layout.prefix(Kind.KEY)):
        try:
            slots.append(json.loads(await store.get(info.key)))
        except (ValueError, ObjectNotFound):
            continue
    return body, slots


async def unlock_repository(
    store: ReadStore, tenant: str, kind: str, secret: bytes
) -> tuple[Keys, RepoParams, dict[str, Any], list[dict[str, Any]]]:
    body, slots = await read_config(store, tenant)
    if not slots:
        raise WrongKeyError("the repository has no key slots", site=store.name, tenant=tenant)
    master = await asyncio.to_thread(crypto.unlock, slots, kind, secret, tenant)
    params = RepoParams.from_json(body)
    keys = Keys(params.suite, bytes.fromhex(body["id"]), master)
    unsigned = {k: v for k, v in body.items() if k != "mac"}
    if keys.config_mac(canonical_config(unsigned)) != body.get("mac"):
        raise IntegrityError(
            "the repository config was modified (MAC mismatch)", site=store.name, tenant=tenant
        )
    return keys, params, body, slots


class Repository:
    """Read access to one tenant repository over an ordered list of sites (preferred first)."""

    def __init__(
        self,
        tenant: str,
        keys: Keys,
        params: RepoParams,
        stores: Sequence[ReadStore],
        on_fallback: Callable[[Fallback], None] | None = None,
    ) -> None:
        if not stores:
            raise RepositoryError("no site to read from", tenant=tenant)
        self.tenant = tenant
        self.layout = Layout(tenant)
        self.keys = keys
        self.params = params
        self.stores = list(stores)
        self.content_id = keys.content_id_function()
        self.report = ReadReport()
        self._on_fallback = on_fallback
        self._index: dict[bytes, BlobLocation] | None = None
        self._index_names: set[str] = set()
        self._searched_all = False
        self._gone: set[str] = set()  # packs found deleted (by a prune) after the index was read
        self._relocating = asyncio.Lock()
        self._late: list[PackIndex] = []  # indexes read while relocating
        self._ciphers: dict[bytes, PackCipher] = {}  # pack salt -> cipher; threads share it (atomic dict ops)

    @classmethod
    async def open(
        cls,
        tenant: str,
        stores: Sequence[ReadStore],
        kind: str,
        secret: bytes,
        on_fallback: Callable[[Fallback], None] | None = None,
    ) -> Repository:
        """Open from the first site that holds the repository; wrong keys fail at once."""
        errors: list[str] = []
        for store in stores:
            try:
                keys, params, _, _ = await unlock_repository(store, tenant, kind, secret)
                ordered = [store, *[s for s in stores if s is not store]]
                return cls(tenant, keys, params, ordered, on_fallback)
            except (StoreError, RepositoryNotFound) as exc:
                errors.append(f"{store.name}: {exc.message}")
        raise RepositoryNotFound(
            "no site could serve the repository: " + "; ".join(errors),
            tenant=tenant,
        )

    # -- fetching with fallback -------------------------------------------------------------------
    async def fetch(
        self,
        h: Handle,
        decode: Callable[[bytes], T],
        offset: int = 0,
        length: int | None = None,
        stores: Sequence[ReadStore] | None = None,
        run: Callable[[Callable[[bytes], T], bytes], Awaitable[T]] | None = None,
    ) -> T:
        """Read `h` (a range of it) and decode it, trying each site in order until one verifies. `decode`
        runs in a thread: ``asyncio.to_thread``, or `run` (a restore's fence, when decoding also writes)."""
        key = self.layout.key(h)
        failures: list[tuple[str, Exception]] = []
        for store in stores if stores is not None else self.stores:
            try:
                data = await store.get(key, offset, length)
                self.report.requests += 1
                self.report.bytes_fetched += len(data)
                result = await (run or asyncio.to_thread)(decode, data)  # never on the event loop
            except (StoreError, IntegrityError) as exc:
                failures.append((store.name, exc))
                fb = Fallback(store.name, key, exc.message)
                self.report.fallbacks.append(fb)
                if self._on_fallback is not None:
                    self._on_fallback(fb)
                continue
            return result
        if all(isinstance(e, ObjectNotFound) for _, e in failures):
            raise ObjectNotFound(
                "object missing at every site", key=key, sites=", ".join(s for s, _ in failures)
            )
        detail = "; ".join(f"{s}: {getattr(e, 'message', e)}" for s, e in failures)
        raise IntegrityError(f"no site holds an intact copy ({detail})", key=key, object=str(h))

    # -- objects ----------------------------------------------------------------------------------
    async def list_handles(
        self, kind: Kind, source_tag: str = "", store: ReadStore | None = None
    ) -> list[Handle]:
        st = store or self.stores[0]
        out = []
        async for info in st.list(self.layout.prefix(kind, source_tag)):
            if info.key.rsplit("/", 1)[-1].startswith("."):
                continue
            try:
                out.append(self.layout.parse(info.key))
            except RepositoryError:  # a stray object (not ours) must not break listing; `check` reports it
                self.report.stray_keys.append(f"{st.name}: {info.key}")
        return out

    async def snapshots(
        self, source: str | None = None, store: ReadStore | None = None
    ) -> list[SnapshotRecord]:
        tag = self.keys.source_tag(source) if source else ""
        handles = await self.list_handles(Kind.SNAPSHOT, tag, store)

        async def one(h: Handle) -> SnapshotRecord:
            return await self.fetch(
                h, lambda b: self.decode_snapshot(h.name, b, source), stores=[store] if store else None
            )

        records = await gather_limited(16, [functools.partial(one, h) for h in handles])
        return sorted(records, key=lambda r: (r.time_ns, r.id))

    def decode_snapshot(self, name: str, data: bytes, source: str | None = None) -> SnapshotRecord:
        rec = format.decode_snapshot(crypto.open_object(self.keys, ObjectType.SNAPSHOT, name, data), name)
        if rec.id != name or rec.tenant != self.tenant or (source is not None and rec.source != source):
            raise IntegrityError("snapshot record does not match its name, tenant or source", object=name)
        return rec

    async def load_index(self) -> dict[bytes, BlobLocation]:
        """The index as listed at the preferred site (``locate`` consults the others on a miss)."""
        if self._index is None:
            self._index = {}
            await self._add_indexes(self.stores[0])
        return self._index

    async def _add_indexes(self, store: ReadStore) -> None:
        assert self._index is not None
        handles = [
            h for h in await self.list_handles(Kind.INDEX, store=store) if h.name not in self._index_names
        ]
        order = [store, *[s for s in self.stores if s is not store]]

        async def one(h: Handle) -> list[PackIndex]:
            return await self.fetch(h, lambda b: self.decode_index(h.name, b), stores=order)

        fetched = await gather_limited(16, [functools.partial(one, h) for h in handles])
        for h, packs in zip(handles, fetched, strict=True):
            self._index_names.add(h.name)
            if self._gone:  # read to relocate: kept, for blobs of packs found gone later
                self._late.extend(packs)
            self._apply(packs)

    def _apply(self, packs: list[PackIndex]) -> None:
        assert self._index is not None
        for p in packs:
            if p.pack in self._gone:
                continue
            for e in p.blobs:
                cur = self._index.get(e.blob_id)
                if cur is None or cur.pack in self._gone:
                    self._index[e.blob_id] = BlobLocation(p.pack, p.salt, e)

    async def prune_markers(self, stores: Sequence[ReadStore] | None = None) -> list[format.PruneMarker]:
        """The prune markers found at any of `stores` (default: every site). An unreachable site is skipped,
        since every marker is written to every site; a marker no site holds intact is skipped, by writers
        and by prune alike, so its packs are simply not condemned."""
        names: dict[str, list[ReadStore]] = {}
        for store in stores if stores is not None else self.stores:
            try:
                for h in await self.list_handles(Kind.PRUNE, store=store):
                    names.setdefault(h.name, []).append(store)
            except StoreError:
                continue

        async def one(name: str) -> format.PruneMarker | None:
            try:
                return await self.fetch(
                    Handle(Kind.PRUNE, name), lambda b: self.decode_prune_marker(name, b), stores=names[name]
                )
            except (StoreError, IntegrityError):  # unreadable everywhere: prune ignores it too
                return None

        found = await gather_limited(16, [functools.partial(one, n) for n in sorted(names)])
        return [m for m in found if m is not None]

    def decode_prune_marker(self, name: str, data: bytes) -> format.PruneMarker:
        m = format.decode_prune_marker(crypto.open_object(self.keys, ObjectType.PRUNE, name, data), name)
        if m.id != name:
            raise IntegrityError("prune marker does not match its name", object=name)
        return m

    def decode_index(self, name: str, data: bytes) -> list[PackIndex]:
        return format.decode_index(crypto.open_object(self.keys, ObjectType.INDEX, name, data), name)

    def pack_cipher(self, salt: bytes) -> PackCipher:
        """The cipher of the pack with this salt: its key is derived (HKDF) once, not once per blob."""
        cipher = self._ciphers.get(salt)
        if cipher is None:
            if len(self._ciphers) >= 1024:  # a restore reads few packs at a time: a small cache will do
                self._ciphers.clear()
            cipher = self._ciphers[salt] = PackCipher(self.keys, salt)
        return cipher

    def open_blob(self, loc: BlobLocation, sealed: bytes | memoryview, blob_id: bytes) -> bytes:
        """Verify and decode one sealed blob: AEAD tag, codec, length, then the keyed content id."""
        where = f"data/{loc.pack}"
        payload = self.pack_cipher(loc.salt).open_blob(loc.entry.btype, blob_id, sealed, where)
        data = format.decode_payload(payload, loc.entry.raw_length, dctx(), where)
        if self.content_id(data) != blob_id:
            raise IntegrityError("blob content does not match its id", object=where, blob=blob_id.hex())
        return data

    async def locate(self, blob_id: bytes) -> BlobLocation:
        index = await self.load_index()
        loc = index.get(blob_id)
        if loc is None and not self._searched_all:
            self._searched_all = True  # the preferred site's index lacks it: read the other sites' indexes
            for store in self.stores[1:]:
                try:
                    await self._add_indexes(store)
                except StoreError:
                    continue
            loc = index.get(blob_id)
        if loc is None:
            raise IntegrityError(
                "blob is referenced but in no index at any site",
                blob=blob_id.hex(),
                tenant=self.tenant,
                sites=",".join(st.name for st in self.stores),
            )
        return loc

    async def relocate(self, gone: str) -> None:
        """Pack `gone` is missing at every site. A prune may have deleted it after this repository read its
        index (a pack is deleted only after every index naming it was replaced; blobs still needed were
        copied to other packs first): read the indexes written since, and move its blobs to their new
        places. A blob that has none stays where it was, and reading it fails again, naming the pack."""
        async with self._relocating:
            if gone in self._gone:
                return
            self._gone.add(gone)
            await self.load_index()
            self._apply(self._late)
            for store in self.stores:
                try:
                    await self._add_indexes(store)
                except StoreError:
                    continue

    async def read_blob(self, blob_id: bytes) -> bytes:
        for attempt in range(2):
            loc = await self.locate(blob_id)
            try:
                return await self.fetch(
                    Handle(Kind.PACK, loc.pack),
                    functools.partial(self.open_blob, loc, blob_id=blob_id),
                    loc.entry.offset,
                    loc.entry.length,
                )
            except ObjectNotFound:
                if attempt:
                    raise
                await self.relocate(loc.pack)
        raise AssertionError("unreachable")

    async def read_tree(self, tree_id: bytes) -> list[format.Node]:
        loc = await self.locate(tree_id)
        if loc.entry.btype is not BlobType.TREE:
            raise IntegrityError("blob referenced as a tree is not one", blob=tree_id.hex())
        raw = await self.read_blob(tree_id)
        return format.decode_tree(raw, f"tree {tree_id.hex()}")


async def gather_limited(n: int, aws: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    sem = asyncio.Semaphore(n)

    async def run(f: Callable[[], Awaitable[T]]) -> T:
        async with sem:
            return await f()

    return await asyncio.gather(*(run(f) for f in aws))


def now_ns() -> int:
    return time.time_ns()


__all__ = [
    "BlobLocation",
    "CryptoError",
    "RepoParams",
    "Repository",
    "canonical_config",
    "init_repository",
    "new_id",
]
