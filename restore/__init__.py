"""Rebuilding a source at a point in time from one site (others as fallback).

1. Open the repository at the chosen site (or the first that answers) with the tenant's key material;
   nothing of the daemon's local state is needed.
2. Choose the newest snapshot at or before the requested time; walk its trees; reject any name that is
   empty, ``.``, ``..``, contains ``/`` or NUL, or repeats in a directory (``restore.plan``).
3. Create a staging directory next to the target (mode 0700), every directory in it, and each file at its
   first write with O_NOFOLLOW. No symlink exists in the staging tree while data is written.
4. Fetch the needed blobs with ranged reads, verify each, write it where it is used (``restore.writer``);
   a missing or corrupt range is read from another site and reported as a fallback.
5. Set modes and times on files (each when its last blob is written, empty ones when they are made), create
   symlinks, then set modes and times on directories, deepest first; flush the file system (``syncfs``).
6. Rename the staging directory onto the target (which must be absent or empty) and fsync its parent.
7. On any failure or cancellation: every blocking step runs in a thread behind the restore's ``Fence`` and
   checks it between items; the fence is closed (no thread of the restore writes any more), then the
   staging directory is removed completely, and a tree already renamed onto the target is moved out again
   (an empty target directory that was there is put back). Only then is the error or cancellation raised:
   the target never holds a half-restored tree and nothing is left next to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from drsvc.core.errors import RestoreError
from drsvc.core.format import Node, SnapshotRecord
from drsvc.core.repository import Fallback, Repository
from restore.plan import Plan, build_plan, choose_snapshot
from restore.writer import (
    BlobWriter,
    Fence,
    Progress,
    Stopped,
    apply_metadata,
    run_to_end,
    sync_filesystem,
)

__all__ = ["Progress", "RestoreResult", "Staging", "Stopped", "restore_tree"]


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


def _check_target(target: Path) -> os.stat_result | None:
    """Refuse a target that is a symlink, not a directory, or not empty; the empty directory's status (to
    put it back if the restore fails), None when the target is absent."""
    if target.is_symlink():
        raise RestoreError(
            "the restore target is a symlink", path=str(target), hint="give a real directory path"
        )
    found = None
    if target.exists():
        if not target.is_dir():
            raise RestoreError("the restore target exists and is not a directory", path=str(target))
        if any(target.iterdir()):
            raise RestoreError(
                "the restore target is not empty",
                path=str(target),
                hint="restore into a new or empty directory; nothing was written",
            )
        found = target.lstat()
    if not target.parent.is_dir():
        raise RestoreError("the target's parent directory does not exist", path=str(target.parent))
    return found


class Staging:
    """A restore's staging directory next to its target, and the fence its blocking work runs behind.

    ``create`` checks the target and makes the directory (plus named scratch directories beside it);
    blocking work runs through ``fence``; ``move_into_place`` (blocking) renames it onto the target;
    ``abandon`` undoes everything after a failure or cancellation (see there).
    """

    def __init__(self, target: Path, found: os.stat_result | None, scratch: tuple[str, ...]) -> None:
        self.target = target
        self.found = found  # the target as it was (an empty directory), None: absent
        stem = f".{target.name}.drsvc-restore-{uuid.uuid4().hex[:12]}"
        self.path = target.parent / stem
        self.scratch = [target.parent / f"{stem}.{s}" for s in scratch]
        self.fence = Fence()
        self.moved = False  # the staging directory was renamed onto the target

    @classmethod
    async def create(cls, target: Path, scratch: tuple[str, ...] = ()) -> Staging:
        """Check `target` (absent or an empty directory; RestoreError else) and make the staging directory
        and the `scratch` directories (mode 0700) next to it."""
        found = await asyncio.to_thread(_check_target, target)
        staging = cls(target, found, scratch)
        made: list[Path] = []
        try:
            for d in (staging.path, *staging.scratch):
                os.mkdir(d, 0o700)
                made.append(d)
        except OSError as exc:
            for d in made:
                os.rmdir(d)
            raise RestoreError(
                f"cannot create the staging directory: {exc.strerror}", path=exc.filename or str(target)
            ) from None
        return staging

    def move_into_place(self, root: Node | None) -> None:
        """Blocking, through the fence: rename the staging directory onto the target (an empty one is
        replaced), set the root's metadata (the staging directory was 0700), fsync the parent."""
        self.fence.check()
        os.rename(self.path, self.target)
        self.moved = True
        if root is not None:
            _apply(str(self.target), root)
        dfd = os.open(self.target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @contextlib.asynccontextmanager
    async def undone_on_failure(self) -> AsyncIterator[None]:
        """Run a restore's steps: any failure or cancellation abandons the staging (``abandon``); an OSError
        is raised again as a RestoreError naming the path."""
        try:
            yield
        except OSError as exc:
            await self.abandon()
            raise RestoreError(
                f"restore failed: {exc.strerror}",
                path=exc.filename or str(self.target),
                hint="nothing was put in place; fix the cause (space, permissions) and restore again",
            ) from exc
        except BaseException:
            await self.abandon()
            raise

    async def abandon(self) -> None:
        """After a failure or cancellation: stop the fenced work and wait for it, then remove the staging
        and scratch directories completely; if the tree was already moved into place, move it out again
        and put back the empty target directory that was there. Runs to its end even if cancelled again;
        that cancellation is raised afterwards."""
        await self.fence.close()
        await run_to_end(asyncio.to_thread(self._undo))

    async def discard_scratch(self) -> None:
        """After success: remove the scratch directories."""
        await run_to_end(asyncio.to_thread(self._remove, self.scratch))

    def _undo(self) -> None:
        if self.moved:
            try:
                os.rename(self.target, self.path)
            except OSError as exc:
                raise RestoreError(
                    f"the restore was stopped but its tree could not be moved out again: {exc.strerror}",
                    path=str(self.target),
                    hint="the tree in place is complete but was not reported: remove it or keep it",
                ) from exc
            self.moved = False
            if self.found is not None:
                os.mkdir(self.target, 0o700)
                _restore_dir(str(self.target), self.found)
        self._remove([self.path, *self.scratch])

    @staticmethod
    def _remove(paths: list[Path]) -> None:
        for p in paths:
            try:
                _remove_tree(p)
            except OSError as exc:
                raise RestoreError(
                    f"cannot remove a restore's staging directory: {exc.strerror}",
                    path=exc.filename or str(p),
                    hint="nothing was put in place; remove the directory by hand",
                ) from exc


async def restore_tree(
    repo: Repository,
    source: str,
    target: Path,
    at_ns: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    concurrency: int = 4,
    finish: Callable[[Path], None] | None = None,
) -> RestoreResult:
    """Restore the newest snapshot of `source` at or before `at_ns` into `target`. `finish` (blocking) may
    add to the staging directory before it is renamed into place (a postgres restore's recovery settings):
    what it writes is put in place with the rest, or, if it fails, removed with the rest."""
    started = time.monotonic()
    target = await asyncio.to_thread(target.absolute)
    await asyncio.to_thread(_check_target, target)
    record = choose_snapshot(await repo.snapshots(source), at_ns, source)
    plan = await build_plan(repo, record)
    staging = await Staging.create(target)
    fence = staging.fence
    async with staging.undone_on_failure():
        await fence.run(_create_skeleton, str(staging.path), plan, fence)
        await BlobWriter(repo, plan, str(staging.path), concurrency, progress, fence).run()
        await fence.run(_finish_metadata, str(staging.path), plan, fence)
        if finish is not None:
            await fence.run(finish, staging.path)
        await fence.run(staging.move_into_place, record.root)
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


def _remove_tree(path: Path) -> None:
    """Remove a staging tree completely, even one whose directories were already made read-only (a
    symlink in it is removed, never followed). Only called once nothing writes into it any more."""
    if os.path.islink(path) or not os.path.isdir(path):
        path.unlink(missing_ok=True)
        return
    os.chmod(path, 0o700)
    for dirpath, dirnames, _ in os.walk(path):  # top-down: a directory is opened before it is walked
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                try:
                    os.chmod(p, 0o700)
                except OSError:
                    pass
    shutil.rmtree(path)


def _restore_dir(path: str, st: os.stat_result) -> None:
    """Put back an (empty) directory's mode, owner and times."""
    if os.geteuid() == 0:
        try:
            os.lchown(path, st.st_uid, st.st_gid)
        except OSError:
            pass
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _create_skeleton(staging: str, plan: Plan, fence: Fence) -> None:
    """Directories, and the empty files; files with content are created by their first write (in parallel)."""
    for rel, _node in plan.dirs:
        if rel:
            fence.check()
            os.mkdir(os.path.join(staging, rel), 0o700)
    for f in plan.files:
        if not f.node.content:
            fence.check()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(os.path.join(staging, f.rel), flags, 0o600)
            try:
                apply_metadata(fd, f.node)
            finally:
                os.close(fd)


def _apply(path: str, node: Node, is_link: bool = False) -> None:
    if os.geteuid() == 0:
        try:
            os.lchown(path, node.uid, node.gid)
        except OSError:
            pass
    if not is_link:
        os.chmod(path, node.mode & 0o7777, follow_symlinks=False)
    os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)


def _finish_metadata(staging: str, plan: Plan, fence: Fence) -> None:
    """Symlinks, then directories' metadata (deepest first), then one flush of the file system. Every file
    already has its metadata (set when its last blob was written) and the writeback of its large spans has
    begun (``restore.writer``)."""
    for rel, node in plan.symlinks:
        fence.check()
        path = os.path.join(staging, rel)
        os.symlink(node.target, path)
        _apply(path, node, is_link=True)
    for rel, dnode in reversed(plan.dirs):
        if dnode is not None:
            _apply(os.path.join(staging, rel), dnode)
    fence.check()
    sync_filesystem(staging)  # every written byte is on disk before the tree counts as restored
