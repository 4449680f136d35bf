"""Turning sources into sealed objects in the local spool.

For a `tree` source (``snapshot.tree``):
1. Load the dedup index: blobs already at every site of the source, or bound there in the outbox.
2. Find the parent snapshot (local tree cache, else the newest at a site).
3. Walk the tree depth-first. A regular file whose (size, mtime_ns, ctime_ns, inode) equal its parent node
   keeps the parent's chunk list unread. Other files are read in the worker pool: cut into chunks (FastCDC,
   or page-aligned for database-like files), each chunk's keyed id computed, new chunks compressed (zstd),
   sealed and packed. A file whose stat changes while read is read again once, then marked changed.
4. Each directory becomes a tree blob (names, modes, owners, times, sizes, chunk ids, subtree ids);
   an unchanged directory yields the same id and is stored once.
5. Full packs are spooled (fsync) and put in the outbox for the source's sites; then the index objects,
   then the snapshot record, both as outbox barriers.
6. Unreadable files are left out with a warning and the snapshot is marked partial.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from drsvc.core.config import SourceConfig
from drsvc.core.repository import Repository
from drsvc.core.spool import Spool
from drsvc.core.stores import ReadStore
from snapshot.dedup import DedupIndex
from snapshot.parents import find_parent, save_parent
from snapshot.tree import Progress, SnapshotResult, Stats, TreeSnapshot
from snapshot.workers import WorkerPool

__all__ = ["SnapshotResult", "Stats", "WorkerPool", "take_snapshot"]


async def take_snapshot(
    source: str,
    config: SourceConfig,
    repo: Repository,
    spool: Spool,
    sites: Sequence[ReadStore],
    cache_dir: Path,
    pool: ThreadPoolExecutor,
    workers: WorkerPool,
    progress: Progress | None = None,
) -> SnapshotResult:
    """Snapshot one tree source into the spool. The caller ships it (``replicator``)."""
    import asyncio

    tenant_cache = cache_dir / repo.tenant
    dedup, warnings = await DedupIndex.load(repo, sites, spool, tenant_cache / "index")
    parent = await find_parent(repo, source, sites, tenant_cache)
    snap = TreeSnapshot(
        source,
        config,
        repo,
        spool,
        dedup,
        pool,
        workers,
        parent=parent.record if parent else None,
        parent_trees=parent,
        progress=progress,
    )
    snap.warnings.extend(warnings)
    result = await snap.run()
    await asyncio.to_thread(
        save_parent, tenant_cache, repo, source, result.record.id, result.sealed, snap.trees
    )
    return result
