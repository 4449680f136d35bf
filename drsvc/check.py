"""Checking a tenant repository at each site, each site on its own.

1. Open the repository at the site (config, key slot, config MAC).
2. Load every index at the site; every pack an index names must exist there.
3. Every snapshot record at the site must decode, and every tree and chunk it reaches must be in the index.
4. With ``read_data``: download every pack, authenticate its header, compare it with the index, and verify
   every blob (AEAD tag, length, keyed content id); and every audit batch and drill report (evidence), which
   must authenticate as what its name says (``verify_evidence``).
Problems name the site and the object; nothing is repaired here (the scrubber repairs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from drsvc.audit import open_batch
from drsvc.core import crypto, format
from drsvc.core.crypto import Keys, ObjectType
from drsvc.core.errors import DRError, IntegrityError
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import BlobLocation, Repository
from drsvc.core.stores import ReadStore


@dataclass
class SiteCheck:
    site: str
    snapshots: int = 0
    packs: int = 0
    blobs: int = 0
    evidence: int = 0  # audit batches and drill reports
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def check_site(
    repo_for_site: Repository,
    store: ReadStore,
    read_data: bool,
    progress: Callable[[str], None] | None = None,
) -> SiteCheck:
    repo = Repository(repo_for_site.tenant, repo_for_site.keys, repo_for_site.params, [store])
    res = SiteCheck(store.name)
    try:
        index = await repo.load_index()
    except DRError as exc:
        res.problems.append(f"index unreadable: {exc}")
        return res
    packs_at_site = {h.name for h in await repo.list_handles(Kind.PACK)}
    indexed_packs: dict[str, list[format.BlobEntry]] = {}
    for loc in index.values():
        indexed_packs.setdefault(loc.pack, []).append(loc.entry)
    res.packs = len(indexed_packs)
    res.blobs = len(index)
    for pack in sorted(set(indexed_packs) - packs_at_site):
        res.problems.append(f"missing pack data/{pack} (named by an index)")

    # snapshots and what they reach
    try:
        records = await repo.snapshots()
    except DRError as exc:
        res.problems.append(f"snapshot records unreadable: {exc}")
        records = []
    res.snapshots = len(records)
    seen_trees: set[bytes] = set()
    for rec in records:
        stack = [rec.tree]
        while stack:
            tid = stack.pop()
            if tid in seen_trees:
                continue
            seen_trees.add(tid)
            if tid not in index:
                res.problems.append(f"snapshot {rec.id[:16]}: tree {tid.hex()[:16]} is in no index")
                continue
            try:
                nodes = await repo.read_tree(tid)
            except DRError as exc:
                res.problems.append(
                    f"snapshot {rec.id[:16]}: tree {tid.hex()[:16]} unreadable: {exc.message}"
                )
                continue
            for n in nodes:
                if n.kind == format.DIR:
                    stack.append(n.subtree)
                for c in n.content:
                    if c not in index:
                        res.problems.append(f"snapshot {rec.id[:16]}: chunk {c.hex()[:16]} is in no index")

    evidence = [h for kind in (Kind.AUDIT, Kind.DRILL) for h in await repo.list_handles(kind)]
    res.evidence = len(evidence)
    res.problems.extend(
        f"stray object {k.split(': ', 1)[1]} (not of this repository)" for k in repo.report.stray_keys
    )
    if read_data:
        sem = asyncio.Semaphore(4)

        async def verify(pack: str, entries: list[format.BlobEntry]) -> None:
            async with sem:
                key = repo.layout.key(Handle(Kind.PACK, pack))
                try:
                    data = await store.get(key)
                except DRError as exc:
                    res.problems.append(f"pack data/{pack}: {exc.message}")
                    return
                res.bytes_read += len(data)
                try:
                    await asyncio.to_thread(verify_pack, repo, pack, data, entries)
                except DRError as exc:
                    res.problems.append(
                        f"pack data/{pack}: {exc.message} {exc.fields.get('blob', '')}".rstrip()
                    )
            if progress:
                progress(pack)

        await asyncio.gather(*(verify(p, e) for p, e in indexed_packs.items() if p in packs_at_site))

        async def verify_one(h: Handle) -> None:
            async with sem:
                try:
                    data = await store.get(repo.layout.key(h))
                    res.bytes_read += len(data)
                    await asyncio.to_thread(verify_evidence, repo.keys, h, data)
                except DRError as exc:
                    res.problems.append(f"{h}: {exc.message}")

        await asyncio.gather(*(verify_one(h) for h in evidence))
    return res


def verify_evidence(keys: Keys, h: Handle, data: bytes) -> None:
    """An audit batch (it opens as the batch its name says) or a drill report (it authenticates as a sealed
    object of type 9 under its name). IntegrityError otherwise."""
    if h.kind is Kind.AUDIT:
        open_batch(keys, h.name, data)
    elif h.kind is Kind.DRILL:
        crypto.open_object(keys, ObjectType.DRILL, h.name, data)
    else:
        raise ValueError(f"not evidence: {h}")


def verify_pack(repo: Repository, pack: str, data: bytes, indexed: list[format.BlobEntry]) -> None:
    """Verify a whole pack object (CPU work: run it off the event loop): authenticate its sealed header,
    require every `indexed` entry to be in it unchanged, and verify every blob (AEAD tag, length, keyed
    content id). Raises IntegrityError naming the pack (and the blob) at the first problem."""
    salt, entries = format.read_pack_header(repo.keys, pack, data)
    by_id = {e.blob_id: e for e in entries}
    for e in indexed:
        if by_id.get(e.blob_id) != e:
            raise IntegrityError("index entry disagrees with the pack header", blob=e.blob_id.hex())
    mv = memoryview(data)
    for e in entries:
        repo.open_blob(BlobLocation(pack, salt, e), mv[e.offset : e.offset + e.length], e.blob_id)
