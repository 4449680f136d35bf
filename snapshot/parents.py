"""Finding a source's parent snapshot and its trees, for incremental snapshots.

1. The trees of the last snapshot this host took of a source are kept in a local cache file
   (``<state>/cache/<tenant>/parent-<source tag>``), so an incremental snapshot reads no trees from a site.
2. Without that file (a new host, a lost state directory), the newest snapshot of the source at the sites is
   the parent and its trees are read from the repository.
3. The file also keeps each tree's recursive counts and the sticky directories (see
   ``snapshot.tree.Incremental``): without them a watched snapshot walks the whole tree. After an
   incremental walk the new trees are added to the parent's (which hold the kept subtrees); trees no longer
   reachable are dropped when they outnumber the directories by half.
A missing or damaged parent only costs speed: every file is read again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import msgpack

from drsvc.core import format
from drsvc.core.errors import DRError
from drsvc.core.format import Node, SnapshotRecord
from drsvc.core.repository import Repository
from drsvc.core.stores import ReadStore

Totals = tuple[int, int, int, int]  # as snapshot.tree.Totals (files, dirs, symlinks, bytes)


class ParentTrees:
    def __init__(
        self,
        repo: Repository,
        record: SnapshotRecord,
        cached: dict[bytes, bytes] | None,
        totals: dict[bytes, Totals] | None = None,
        sticky: frozenset[str] | None = None,
    ) -> None:
        self.repo = repo
        self.record = record
        self.cached = cached or {}
        self.totals = totals  # None: unknown (an older cache file, or trees read from a site)
        self.sticky = sticky

    async def __call__(self, tree_id: bytes) -> list[Node]:
        data = self.cached.get(tree_id)
        if data is not None and self.repo.content_id(data) == tree_id:  # a damaged cache entry is not used
            return format.decode_tree(data, f"cached tree {tree_id.hex()}")
        return await self.repo.read_tree(tree_id)


def cache_path(cache_dir: Path, repo: Repository, source: str) -> Path:
    return cache_dir / f"parent-{repo.keys.source_tag(source)}"


async def find_parent(
    repo: Repository, source: str, sites: Sequence[ReadStore], cache_dir: Path
) -> ParentTrees | None:
    path = cache_path(cache_dir, repo, source)
    try:
        raw = await asyncio.to_thread(path.read_bytes)
        obj = msgpack.unpackb(raw)
        record = repo.decode_snapshot(obj["id"], obj["record"])
        totals, sticky = obj.get("totals"), obj.get("sticky")
        return ParentTrees(
            repo,
            record,
            {bytes(k): bytes(v) for k, v in obj["trees"].items()},
            None if totals is None else {bytes(k): (v[0], v[1], v[2], v[3]) for k, v in totals.items()},
            None if sticky is None else frozenset(sticky),
        )
    except FileNotFoundError:
        pass
    except (DRError, ValueError, KeyError, TypeError, msgpack.UnpackException):
        await asyncio.to_thread(path.unlink, True)
    for store in sites:
        try:
            records = await repo.snapshots(source, store=store)
        except DRError:
            continue
        if records:
            return ParentTrees(repo, records[-1], None)
        return None
    return None


def save_parent(
    cache_dir: Path,
    repo: Repository,
    source: str,
    record_id: str,
    sealed_record: bytes,
    trees: dict[bytes, bytes],
    totals: dict[bytes, Totals] | None = None,
    sticky: set[str] | frozenset[str] | None = None,
) -> None:
    """Keep this snapshot's trees for the next incremental (blocking)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_path(cache_dir, repo, source)
    tmp = path.with_suffix(".tmp")
    obj: dict[str, object] = {"id": record_id, "record": sealed_record, "trees": trees}
    if totals is not None and sticky is not None:
        obj["totals"] = {k: list(v) for k, v in totals.items()}
        obj["sticky"] = sorted(sticky)
    tmp.write_bytes(msgpack.packb(obj))
    os.replace(tmp, path)


def merge_trees(
    root: bytes,
    old: tuple[dict[bytes, bytes], dict[bytes, Totals]],
    new: tuple[dict[bytes, bytes], dict[bytes, Totals]],
) -> tuple[dict[bytes, bytes], dict[bytes, Totals]]:
    """The trees and totals of an incremental snapshot (rooted at `root`): its new ones plus the parent's,
    which hold its kept subtrees; the unreachable ones are dropped once they are a third (blocking)."""
    trees = {**old[0], **new[0]}
    totals = {**old[1], **new[1]}
    dirs = totals[root][1] if root in totals else 0
    if len(trees) <= dirs * 3 // 2 + 64:
        return trees, totals
    keep: dict[bytes, bytes] = {}
    todo = [root]
    while todo:
        tid = todo.pop()
        if tid in keep or tid not in trees:
            continue
        keep[tid] = trees[tid]
        todo.extend(format.tree_refs(trees[tid], tid.hex())[0])
    return keep, {k: totals[k] for k in keep if k in totals}
