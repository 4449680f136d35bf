"""Planning a restore: choose the snapshot for the requested point, walk its trees, check every name."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from drsvc.core import format
from drsvc.core.crypto import BlobType
from drsvc.core.errors import IntegrityError, ObjectNotFound, RestoreError, UnsafePathError
from drsvc.core.format import Node, SnapshotRecord
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import BlobLocation, Repository


def choose_snapshot(records: list[SnapshotRecord], at_ns: int | None, source: str) -> SnapshotRecord:
    """The newest snapshot at or before `at_ns` (None: the latest)."""
    if not records:
        raise RestoreError(
            "the source has no snapshots at this site",
            source=source,
            hint="check the source name, or try another site with --site",
        )
    eligible = [r for r in records if at_ns is None or r.time_ns <= at_ns]
    if not eligible:
        raise RestoreError(
            "no snapshot at or before the requested time",
            source=source,
            hint="`drsvc ls` shows the restorable range",
        )
    return max(eligible, key=lambda r: (r.time_ns, r.id))


def check_name(name: bytes, where: str) -> str:
    """A single safe path component, or UnsafePathError."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise UnsafePathError(f"unsafe name {name!r} in the snapshot", path=where)
    import os

    return os.fsdecode(name)


@dataclass
class FilePlan:
    rel: str
    node: Node


@dataclass
class Plan:
    snapshot: SnapshotRecord
    dirs: list[tuple[str, Node | None]] = field(default_factory=list)  # parents before children
    files: list[FilePlan] = field(default_factory=list)
    symlinks: list[tuple[str, Node]] = field(default_factory=list)
    total_bytes: int = 0

    @property
    def blobs(self) -> set[bytes]:
        return {c for f in self.files for c in f.node.content}


TREE_RANGE_MAX = 4 * 1024 * 1024  # the trees of one level are read in ranges of up to this many bytes
RANGE_GAP = 64 * 1024  # neighbouring blobs of a pack at most this far apart are read in one range
TREE_READS = 8  # ranges of trees read at once


def coalesce(
    blobs: dict[bytes, BlobLocation], max_span: int, gap: int = RANGE_GAP
) -> list[tuple[str, int, int, list[tuple[bytes, BlobLocation]]]]:
    """Ranged reads covering `blobs`: (pack, start, end, [(blob id, location)]), neighbours in a pack joined
    while the gap between them is at most `gap` and the range at most `max_span` bytes."""
    by_pack: dict[str, list[tuple[bytes, BlobLocation]]] = defaultdict(list)
    for bid, loc in blobs.items():
        by_pack[loc.pack].append((bid, loc))
    out: list[tuple[str, int, int, list[tuple[bytes, BlobLocation]]]] = []
    for pack, items in by_pack.items():
        items.sort(key=lambda b: b[1].entry.offset)
        start = end = -1
        cur: list[tuple[bytes, BlobLocation]] = []
        for bid, loc in items:
            e = loc.entry
            if cur and e.offset - end <= gap and e.offset + e.length - start <= max_span:
                end = e.offset + e.length
                cur.append((bid, loc))
            else:
                if cur:
                    out.append((pack, start, end, cur))
                start, end, cur = e.offset, e.offset + e.length, [(bid, loc)]
        if cur:
            out.append((pack, start, end, cur))
    return out


async def read_trees(repo: Repository, tree_ids: Iterable[bytes]) -> dict[bytes, list[Node]]:
    """The nodes of each tree, verified; neighbouring trees of a pack are read in one ranged read (one
    request and one thread hop for many trees, where ``Repository.read_tree`` makes one each)."""
    locs: dict[bytes, BlobLocation] = {}
    for tid in tree_ids:
        if tid not in locs:
            loc = locs[tid] = await repo.locate(tid)
            if loc.entry.btype is not BlobType.TREE:
                raise IntegrityError("blob referenced as a tree is not one", blob=tid.hex())
    sem = asyncio.Semaphore(TREE_READS)
    out: dict[bytes, list[Node]] = {}

    async def one(pack: str, start: int, end: int, blobs: list[tuple[bytes, BlobLocation]]) -> None:
        def verify(data: bytes) -> list[bytes]:
            mv = memoryview(data)
            return [
                repo.open_blob(
                    loc, mv[loc.entry.offset - start : loc.entry.offset - start + loc.entry.length], bid
                )
                for bid, loc in blobs
            ]

        async with sem:
            try:
                raws = await repo.fetch(Handle(Kind.PACK, pack), verify, start, end - start)
            except ObjectNotFound:  # the pack was pruned away meanwhile: one by one, relocating them
                for bid, _ in blobs:
                    out[bid] = await repo.read_tree(bid)
                return
        for (bid, _), raw in zip(blobs, raws, strict=True):
            out[bid] = format.decode_tree(raw, f"tree {bid.hex()}")

    await asyncio.gather(*(one(*r) for r in coalesce(locs, TREE_RANGE_MAX)))
    return out


async def build_plan(repo: Repository, record: SnapshotRecord) -> Plan:
    """Walk the snapshot's trees level by level (each level's trees read together: ``read_trees``)."""
    plan = Plan(record)
    plan.dirs.append(("", None))
    level: list[tuple[bytes, str]] = [(record.tree, "")]
    depth = 0
    while level:
        if depth > 512:
            raise UnsafePathError("directory nesting deeper than 512 levels", path=level[0][1])
        trees = await read_trees(repo, (t for t, _ in level))
        below: list[tuple[bytes, str]] = []
        for tree_id, rel in level:
            seen: set[bytes] = set()
            for n in trees[tree_id]:
                name = check_name(n.name, rel or ".")
                if n.name in seen:
                    raise UnsafePathError(f"name {name!r} appears twice in one directory", path=rel or ".")
                seen.add(n.name)
                child = f"{rel}/{name}" if rel else name
                if n.kind == format.DIR:
                    plan.dirs.append((child, n))
                    below.append((n.subtree, child))
                elif n.kind == format.FILE:
                    plan.files.append(FilePlan(child, n))
                    plan.total_bytes += n.size
                elif n.kind == format.SYMLINK:
                    plan.symlinks.append((child, n))
        level = below
        depth += 1
    return plan  # plan.dirs: level by level, so parents before children
