"""Planning a restore: choose the snapshot for the requested point, walk its trees, check every name."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from drsvc.core import format
from drsvc.core.errors import RestoreError, UnsafePathError
from drsvc.core.format import Node, SnapshotRecord
from drsvc.core.repository import Repository


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


async def build_plan(repo: Repository, record: SnapshotRecord) -> Plan:
    plan = Plan(record)
    plan.dirs.append(("", None))
    sem = asyncio.Semaphore(16)

    async def walk(tree_id: bytes, rel: str, depth: int) -> None:
        if depth > 512:
            raise UnsafePathError("directory nesting deeper than 512 levels", path=rel)
        async with sem:
            nodes = await repo.read_tree(tree_id)
        seen: set[bytes] = set()
        subdirs = []
        for n in nodes:
            name = check_name(n.name, rel or ".")
            if n.name in seen:
                raise UnsafePathError(f"name {name!r} appears twice in one directory", path=rel or ".")
            seen.add(n.name)
            child = f"{rel}/{name}" if rel else name
            if n.kind == format.DIR:
                plan.dirs.append((child, n))
                subdirs.append(walk(n.subtree, child, depth + 1))
            elif n.kind == format.FILE:
                plan.files.append(FilePlan(child, n))
                plan.total_bytes += n.size
            elif n.kind == format.SYMLINK:
                plan.symlinks.append((child, n))
        await asyncio.gather(*subdirs)

    await walk(record.tree, "", 0)
    plan.dirs.sort(key=lambda d: d[0].count("/") if d[0] else -1)
    return plan
