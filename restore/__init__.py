"""Rebuilding a source at a point in time from one site (others as fallback).

1. Open the repository at the chosen site (or the first that answers) with the tenant's key material;
   nothing of the daemon's local state is needed.
2. Choose the newest snapshot at or before the requested time; walk its trees; reject any name that is
   empty, ``.``, ``..``, contains ``/`` or NUL, or repeats in a directory (``restore.plan``).
3. Create a staging directory next to the target (mode 0700), every directory in it, and each file at its
   first write with O_NOFOLLOW. No symlink exists in the staging tree while data is written.
4. Fetch the needed blobs with ranged reads, verify each, write it where it is used (``restore.writer``);
   a missing or corrupt range is read from another site and reported as a fallback.
5. Set modes and times on files, create symlinks, then set modes and times on directories, deepest first.
6. Rename the staging directory onto the target (which must be absent or empty) and fsync its parent.
   On any failure the staging directory is removed: the target never holds a half-restored tree.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from drsvc.core.errors import RestoreError
from drsvc.core.format import Node, SnapshotRecord
from drsvc.core.repository import Fallback, Repository
from restore.plan import Plan, build_plan, choose_snapshot
from restore.writer import BlobWriter, Progress

__all__ = ["Progress", "RestoreResult", "restore_tree"]


@dataclass
class RestoreResult:
    source: str
    snapshot: SnapshotRecord
    target: str
    site: str
    requested_ns: int | None
    files: int
    dirs: int
    symlinks: int
    bytes: int
    seconds: float
    fallbacks: list[Fallback] = field(default_factory=list)
    bytes_fetched: int = 0

    @property
    def recovery_point_ns(self) -> int:
        return self.snapshot.time_ns

    @property
    def rpo_achieved_s(self) -> float | None:
        """Requested point minus restored point (None for 'latest')."""
        if self.requested_ns is None:
            return None
        return max(0, self.requested_ns - self.snapshot.time_ns) / 1e9


def _check_target(target: Path) -> None:
    if target.is_symlink():
        raise RestoreError(
            "the restore target is a symlink", path=str(target), hint="give a real directory path"
        )
    if target.exists():
        if not target.is_dir():
            raise RestoreError("the restore target exists and is not a directory", path=str(target))
        if any(target.iterdir()):
            raise RestoreError(
                "the restore target is not empty",
                path=str(target),
                hint="restore into a new or empty directory; nothing was written",
            )
    if not target.parent.is_dir():
        raise RestoreError("the target's parent directory does not exist", path=str(target.parent))


async def restore_tree(
    repo: Repository,
    source: str,
    target: Path,
    at_ns: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    concurrency: int = 4,
) -> RestoreResult:
    started = time.monotonic()
    target = await asyncio.to_thread(target.absolute)
    await asyncio.to_thread(_check_target, target)
    record = choose_snapshot(await repo.snapshots(source), at_ns, source)
    plan = await build_plan(repo, record)
    staging = target.parent / f".{target.name}.drsvc-restore-{uuid.uuid4().hex[:12]}"
    try:
        os.mkdir(staging, 0o700)
    except OSError as exc:
        raise RestoreError(
            f"cannot create the staging directory: {exc.strerror}", path=str(staging)
        ) from None
    try:
        await asyncio.to_thread(_create_skeleton, str(staging), plan)
        await BlobWriter(repo, plan, str(staging), concurrency, progress).run()
        await asyncio.to_thread(_finish_metadata, str(staging), plan)
        await asyncio.to_thread(_move_into_place, staging, target, record.root)
    except OSError as exc:
        await asyncio.to_thread(_remove_staging, staging)
        raise RestoreError(
            f"restore failed: {exc.strerror}",
            path=exc.filename or str(target),
            hint="nothing was put in place; fix the cause (space, permissions) and restore again",
        ) from exc
    except BaseException:
        await asyncio.to_thread(_remove_staging, staging)
        raise
    return RestoreResult(
        source=source,
        snapshot=record,
        target=str(target),
        site=repo.stores[0].name,
        requested_ns=at_ns,
        files=len(plan.files),
        dirs=len(plan.dirs) - 1,
        symlinks=len(plan.symlinks),
        bytes=plan.total_bytes,
        seconds=time.monotonic() - started,
        fallbacks=list(repo.report.fallbacks),
        bytes_fetched=repo.report.bytes_fetched,
    )


def _remove_staging(staging: Path) -> None:
    """Remove a staging tree, even one whose directories were already made read-only."""
    for dirpath, dirnames, _ in os.walk(staging):
        for d in dirnames:
            try:
                os.chmod(os.path.join(dirpath, d), 0o700, follow_symlinks=False)
            except OSError:
                pass
    shutil.rmtree(staging, ignore_errors=True)


def _create_skeleton(staging: str, plan: Plan) -> None:
    """Directories, and the empty files; files with content are created by their first write (in parallel)."""
    for rel, _node in plan.dirs:
        if rel:
            os.mkdir(os.path.join(staging, rel), 0o700)
    for f in plan.files:
        if not f.node.content:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            os.close(os.open(os.path.join(staging, f.rel), flags, 0o600))


def _apply(path: str, node: Node, is_link: bool = False) -> None:
    if os.geteuid() == 0:
        try:
            os.lchown(path, node.uid, node.gid)
        except OSError:
            pass
    if not is_link:
        os.chmod(path, node.mode & 0o7777, follow_symlinks=False)
    os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)


def _finish_metadata(staging: str, plan: Plan) -> None:
    os.sync()  # one flush for every written file before it counts as restored
    for f in plan.files:
        _apply(os.path.join(staging, f.rel), f.node)
    for rel, node in plan.symlinks:
        path = os.path.join(staging, rel)
        os.symlink(node.target, path)
        _apply(path, node, is_link=True)
    for rel, dnode in reversed(plan.dirs):
        if dnode is not None:
            _apply(os.path.join(staging, rel), dnode)


def _move_into_place(staging: Path, target: Path, root: Node | None) -> None:
    if target.exists():
        target.rmdir()  # checked empty before we began
    os.rename(staging, target)
    if root is not None:  # the source directory's own mode, owner and mtime (the staging dir was 0700)
        _apply(str(target), root)
    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
