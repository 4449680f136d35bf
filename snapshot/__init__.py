"""Turning sources into sealed objects in the local spool.

For a `tree` source (``snapshot.tree``):
1. Load the dedup index: blobs already at every site of the source, or bound there in the outbox. The
   daemon keeps it in memory between a watched source's snapshots (``dedup.IndexCache``), reloading it
   from the sites on a new prune marker, an unreachable site, or after min(600 s, grace / 2).
2. Find the parent snapshot (local tree cache, else the newest at a site).
3. Walk the tree depth-first. A watched source's snapshot may walk only the directories its inotify events
   touched and their ancestors, keeping the parent's subtrees elsewhere (``changes``; the first snapshot,
   a lost event and the periodic rescan walk everything). A regular file whose (size, mtime_ns, ctime_ns,
   inode) equal its parent node keeps the parent's chunk list unread. Other files are read in the worker
   pool: cut into chunks (FastCDC,
   or page-aligned for database-like files), each chunk's keyed id computed, new chunks compressed (zstd),
   sealed and packed. A file whose stat changes while read is read again once, then marked changed.
4. Each directory becomes a tree blob (names, modes, owners, times, sizes, chunk ids, subtree ids);
   an unchanged directory yields the same id and is stored once.
5. Full packs are spooled (fsync) and put in the outbox for the source's sites; then the index objects,
   then the snapshot record, both as outbox barriers.
6. Unreadable files are left out with a warning and the snapshot is marked partial.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Imports are lazy so that the worker processes (snapshot.workers, preloaded by the forkserver) do not load
# the config model and the walker: a worker needs only drsvc.core's codecs and this package's data path.
if TYPE_CHECKING:
    from snapshot.dispatch import LOCAL_LIMIT
    from snapshot.run import take_snapshot
    from snapshot.tree import Progress, SnapshotResult, Stats
    from snapshot.workers import WorkerPool

__all__ = ["LOCAL_LIMIT", "Progress", "SnapshotResult", "Stats", "WorkerPool", "take_snapshot"]


def __getattr__(name: str) -> Any:
    if name == "take_snapshot":
        from snapshot.run import take_snapshot

        return take_snapshot
    if name in ("Progress", "SnapshotResult", "Stats"):
        import snapshot.tree

        return getattr(snapshot.tree, name)
    if name == "LOCAL_LIMIT":
        from snapshot.dispatch import LOCAL_LIMIT

        return LOCAL_LIMIT
    if name == "WorkerPool":
        from snapshot.workers import WorkerPool

        return WorkerPool
    raise AttributeError(name)
