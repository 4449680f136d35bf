"""Finding a source's parent snapshot and its trees, for incremental snapshots.

1. The trees of the last snapshot this host took of a source are kept in a local cache file
   (``<state>/cache/<tenant>/parent-<source tag>``), so an incremental snapshot reads no trees from a site.
2. Without that file (a new host, a lost state directory), the newest snapshot of the source at the sites is
   the parent and its trees are read from the repository.
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


class ParentTrees:
    def __init__(self, repo: Repository, record: SnapshotRecord, cached: dict[bytes, bytes] | None) -> None:
        self.repo = repo
        self.record = record
        self.cached = cached or {}

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
        return ParentTrees(repo, record, {bytes(k): bytes(v) for k, v in obj["trees"].items()})
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
) -> None:
    """Keep this snapshot's trees for the next incremental (blocking)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_path(cache_dir, repo, source)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgpack.packb({"id": record_id, "record": sealed_record, "trees": trees}))
    os.replace(tmp, path)
