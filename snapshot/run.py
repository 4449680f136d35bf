"""Taking one snapshot of a source: dedup index, parent, walk, and the parent cache for next time."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from drsvc.core.config import SourceConfig
from drsvc.core.repository import Repository
from drsvc.core.spool import Spool
from drsvc.core.stores import ReadStore
from snapshot.dedup import DedupIndex
from snapshot.dispatch import LOCAL_LIMIT
from snapshot.parents import find_parent, save_parent
from snapshot.tree import Progress, SnapshotResult, TreeSnapshot
from snapshot.workers import WorkerPool


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
    local_limit: int = LOCAL_LIMIT,
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
        local_limit=local_limit,
    )
    snap.warnings.extend(warnings)
    result = await snap.run()
    await asyncio.to_thread(
        save_parent, tenant_cache, repo, source, result.record.id, result.sealed, snap.trees
    )
    return result
