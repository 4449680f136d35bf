"""Taking one snapshot of a source: dedup index, parent, walk, and the parent cache for next time.

With an ``IndexCache`` (the daemon), the dedup index of the last snapshot is used again when still valid, and
given ``changes`` (a watcher's ``take``) the walk is incremental when it may be: the index is the cached one
that covers the parent (every blob the parent references is in it, so its subtrees can be kept unchecked) and
the parent cache has the trees' totals and sticky directories. Otherwise the walk is a full one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from drsvc.core.config import SourceConfig
from drsvc.core.repository import Repository
from drsvc.core.spool import Spool
from drsvc.core.stores import ReadStore
from snapshot.dedup import CachedIndex, DedupIndex, IndexCache
from snapshot.dispatch import LOCAL_LIMIT
from snapshot.parents import ParentTrees, find_parent, merge_trees, save_parent
from snapshot.tree import Changes, Incremental, Progress, SnapshotResult, TreeSnapshot
from snapshot.workers import WorkerPool

log = logging.getLogger("drsvc.snapshot")


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
    changes: Callable[[], Changes | None] | None = None,
    index_cache: IndexCache | None = None,
    full: bool = False,
) -> SnapshotResult:
    """Snapshot one tree source into the spool. The caller ships it (``replicator``).

    `changes` is called as the walk begins (a watcher's changes since the last call; None: a full walk);
    `index_cache` keeps the dedup index between snapshots. `full` (the periodic rescan): reload the index
    from the sites and walk everything, whatever the changes."""
    tenant_cache = cache_dir / repo.tenant
    held: CachedIndex | None = None
    if index_cache is not None and not full:
        held = await index_cache.take(repo, sites)
    warnings: list[str] = []
    if held is None:
        dedup, warnings = await DedupIndex.load(repo, sites, spool, tenant_cache / "index")
        # an unreachable site left its indexes out: not worth keeping
        held = CachedIndex(dedup, time.monotonic()) if index_cache is not None and not warnings else None
    else:
        dedup = held.index
    parent = await find_parent(repo, source, sites, tenant_cache)
    incremental = _incremental(source, parent, held, changes, full)
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
        incremental=incremental,
    )
    snap.warnings.extend(warnings)
    result = await snap.run()
    dedup.add_all([b.blob_id for p in snap.packs for b in p.blobs])
    trees, totals = snap.trees, snap.totals
    if snap.inc is not None and parent is not None and parent.totals is not None:
        try:
            trees, totals = await asyncio.to_thread(
                merge_trees, result.record.tree, (parent.cached, parent.totals), (trees, totals)
            )
        except Exception as exc:  # a damaged cached tree: the next snapshot walks everything
            log.warning("parent trees not merged", extra={"source": source, "error": str(exc)})
            totals = {}
    await asyncio.to_thread(
        save_parent,
        tenant_cache,
        repo,
        source,
        result.record.id,
        result.sealed,
        trees,
        totals or None,
        snap.sticky,
    )
    if index_cache is not None and held is not None:
        index_cache.keep(repo, sites, held, source, result.record.id)
    return result


def _incremental(
    source: str,
    parent: ParentTrees | None,
    held: CachedIndex | None,
    changes: Callable[[], Changes | None] | None,
    full: bool,
) -> Callable[[], Incremental | None] | None:
    """The walk's changes, called as it begins: None (a full walk) unless it may be incremental (see the
    module docstring). The watcher's changes are taken either way: a full walk covers them."""
    if changes is None:
        return None
    allowed = (
        not full
        and parent is not None
        and held is not None
        and held.reused
        and held.covers.get(source) == parent.record.id
        and parent.totals is not None
        and parent.sticky is not None
    )

    def take() -> Incremental | None:
        c = changes()
        if c is None or not allowed or parent is None or parent.totals is None or parent.sticky is None:
            return None
        return Incremental(parent.totals, parent.sticky, c)

    return take
