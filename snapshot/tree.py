"""The `tree` source: a directory tree, snapshotted into trees and chunks.

See ``snapshot/__init__.py`` for the algorithm. The event loop only walks and schedules: reading, chunking,
hashing, compressing and sealing file data run in the worker processes (``snapshot.workers``); directory
listing and tree blobs run in the thread pool.

An incremental walk (``changes``, from a watcher) lists only the directories that changed, those created or
moved in (and everything below them), the parent's *sticky* directories (see ``Incremental``) and their
ancestors up to the root; every other directory keeps the parent's subtree id. It yields the same trees as
a full walk of the same state, provided the events were complete and the parent's blobs are all in
``dedup``, which the caller vouches for (``snapshot.run``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from drsvc.core import crypto, format
from drsvc.core.config import SourceConfig
from drsvc.core.crypto import BlobType, ObjectType
from drsvc.core.errors import SnapshotError
from drsvc.core.format import Node, SnapshotRecord
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import Repository, new_id, now_ns
from drsvc.core.spool import Spool
from snapshot.chunker import ChunkParams
from snapshot.dedup import DedupIndex
from snapshot.dispatch import LOCAL_LIMIT, Dispatcher
from snapshot.packer import Packer
from snapshot.reader import FileJob, FileOut, FileReader, SpoolWriteError, same_stat
from snapshot.workers import WorkerContext, WorkerPool, WorkerTotals, routed_batches

T = TypeVar("T")

SMALL_FILE = 256 * 1024
BATCH_BYTES = 4 * 1024 * 1024
BATCH_FILES = 64
INDEX_BLOBS_PER_OBJECT = 100_000
# page files above this are read in segments, in parallel (a multiple of page_chunk)
SEGMENT = 16 * 1024 * 1024


@dataclass
class Stats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    files_read: int = 0
    files_unchanged: int = 0
    bytes_total: int = 0
    bytes_read: int = 0
    blobs_new: int = 0
    bytes_stored: int = 0
    changed_while_read: int = 0
    errors: int = 0
    dirs_kept: int = 0  # incremental walks: directories kept from the parent unlisted (counted in dirs)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class SnapshotResult:
    record: SnapshotRecord
    key: str  # the snapshot record's store key
    sealed: bytes  # the sealed record, as spooled
    stats: Stats
    warnings: list[str] = field(default_factory=list)


Progress = Callable[[Stats], None]
# recursive counts of a tree: (files, dirs, symlinks, bytes of files), kept with the parent's trees
Totals = tuple[int, int, int, int]


@dataclass(frozen=True)
class Changes:
    """What changed in a tree since its parent snapshot, by directory (relative paths, "" = the root)."""

    dirs: frozenset[str] = frozenset()  # directories whose entries changed: listed again
    deep: frozenset[str] = frozenset()  # directories created or moved in: everything below them is listed

    def touched(self, sticky: frozenset[str] = frozenset()) -> set[str]:
        """Every directory listed again: the changed ones, the sticky ones and their ancestors."""
        out = {""}
        for rel in (*self.dirs, *self.deep, *sticky):
            while rel not in out:
                out.add(rel)
                rel = rel.rpartition("/")[0]
        return out


@dataclass
class Incremental:
    """A parent a walk may take subtrees from without listing them: its trees' totals and sticky
    directories (those a watcher cannot vouch for: hard-linked or page files, errors, warnings, files that
    changed while read), and the changes since."""

    totals: dict[bytes, Totals]
    sticky: frozenset[str]
    changes: Changes


class TreeSnapshot:
    """One snapshot of one tree source. Create, ``await run()``, read the result."""

    def __init__(
        self,
        source: str,
        config: SourceConfig,
        repo: Repository,
        spool: Spool,
        dedup: DedupIndex,
        pool: ThreadPoolExecutor,
        workers: WorkerPool,
        parent: SnapshotRecord | None = None,
        parent_trees: Callable[[bytes], Awaitable[list[Node]]] | None = None,
        progress: Progress | None = None,
        local_limit: int = LOCAL_LIMIT,
        incremental: Callable[[], Incremental | None] | None = None,
    ) -> None:
        self.source = source
        self.config = config
        self.repo = repo
        self.spool = spool
        self.dedup = dedup
        self.pool = pool
        self.workers = workers
        self.parent = parent
        self.parent_trees = parent_trees
        self.progress = progress
        self.stats = Stats()
        self.warnings: list[str] = []
        self.id_fn = repo.keys.content_id_function()
        p = repo.params
        self.sites = list(config.sites)
        # tree blobs, and the data of the in-process reader (small snapshots): see snapshot.dispatch
        self.packer = Packer(repo.keys, repo.layout, spool, self.sites, p.pack_size, p.compression_level)
        chunk = ChunkParams(p.chunk_min, p.chunk_avg, p.chunk_max, repo.keys.chunker_seed)
        local = FileReader(chunk, config.page_chunk, self.id_fn, dedup.claim, self.packer)
        self.dispatch = Dispatcher(workers, self._worker_context, local, local_limit)
        self._dirs = asyncio.Semaphore(8)
        self._root_dev = 0
        self.trees: dict[bytes, bytes] = {}  # tree id -> encoded tree, for the local parent cache
        self.totals: dict[bytes, Totals] = {}  # tree id -> its recursive counts, ditto
        self.sticky: set[str] = set()  # directories the next incremental walk lists whatever the events
        self.packs: list[format.PackIndex] = []  # what this snapshot stored (for the caller's dedup index)
        self._incremental = incremental  # called as the walk begins: None walks everything
        self.inc: Incremental | None = None
        self._touched: set[str] = set()

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args))

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    # -- entry point ------------------------------------------------------------------------------
    async def run(self) -> SnapshotResult:
        root = str(self.config.path)
        started = now_ns()
        try:
            st = await asyncio.to_thread(os.stat, root)
        except OSError as exc:
            raise SnapshotError(
                f"cannot read the source's path: {exc.strerror}",
                source=self.source,
                path=root,
                hint="check sources.<name>.path and the daemon's permissions",
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise SnapshotError("the source's path is not a directory", source=self.source, path=root)
        self._root_dev = st.st_dev
        # start the worker processes now (0.3 s, in parallel with the walk) if this snapshot may need them:
        # a first snapshot, or a source large enough that its changed files may exceed the in-process share
        big = self.parent is None or self.parent.stats.get("bytes_total", 0) > self.dispatch.local_limit
        if big:
            warming = asyncio.ensure_future(self.workers.warm())
        parent_root = await self._parent_nodes(self.parent.tree) if self.parent else None
        inc = self._incremental() if self._incremental is not None else None  # as the walk begins
        self.inc = inc if parent_root is not None else None
        if self.inc is not None:
            self._touched = self.inc.changes.touched(self.inc.sticky)
        try:
            root_id = await self._dir(root, "", parent_root, self.inc is not None)
            totals = await self.dispatch.finish()
        except BaseException:  # no half-written pack stays in the spool
            await asyncio.shield(self._abort())
            raise
        finally:
            if big:
                await asyncio.gather(warming, return_exceptions=True)
        await self._run(self.packer.flush)
        if totals is None:
            totals = WorkerTotals([], 0, 0)
        packs = [*totals.packs, *self.packer.packs]
        self.packs = packs
        index_names = await self._run(self._write_indexes, packs)
        self.spool.notify()  # the workers' packs were committed in other processes
        self.stats.blobs_new = self.packer.blobs_written + totals.blobs_written
        self.stats.bytes_stored = self.packer.bytes_written + totals.bytes_written
        record = SnapshotRecord(
            id=new_id(),
            tenant=self.repo.tenant,
            source=self.source,
            time_ns=started,
            tree=root_id,
            parent=self.parent.id if self.parent else None,
            host=socket.gethostname(),
            finished_ns=now_ns(),
            partial=self.stats.errors > 0,
            warnings=tuple(self.warnings[:1000]),
            stats=self.stats.as_dict(),
            index=tuple(index_names),
            root=_node(b".", st, format.DIR, subtree=root_id),
        )
        h = Handle(Kind.SNAPSHOT, record.id, self.repo.keys.source_tag(self.source))
        key = self.repo.layout.key(h)
        sealed = crypto.seal_object(
            self.repo.keys, ObjectType.SNAPSHOT, record.id, format.encode_snapshot(record)
        )
        await self._run(self.spool.put, key, sealed, self.repo.tenant, self.sites, True)
        return SnapshotResult(record, key, sealed, self.stats, self.warnings)

    async def _abort(self) -> None:
        """Stop the readers first (their threads may still be writing packs), then drop the open packs."""
        await self.dispatch.abort()
        await self._run(self.packer.abort)

    def _worker_context(self) -> WorkerContext:
        return WorkerContext(
            self.repo.tenant,
            self.repo.keys,
            self.repo.params,
            self.spool.state_dir,
            tuple(self.sites),
            self.config.page_chunk,
            self.dedup.frozen(),
        )

    def _write_indexes(self, packs: list[format.PackIndex]) -> list[str]:
        names = []
        batch: list[format.PackIndex] = []
        count = 0
        for p in [*packs, None]:
            if p is not None:
                batch.append(p)
                count += len(p.blobs)
            if batch and (p is None or count >= INDEX_BLOBS_PER_OBJECT):
                name = new_id()
                sealed = crypto.seal_object(
                    self.repo.keys, ObjectType.INDEX, name, format.encode_index(batch)
                )
                self.spool.put(
                    self.repo.layout.key(Handle(Kind.INDEX, name)),
                    sealed,
                    self.repo.tenant,
                    self.sites,
                    barrier=True,
                )
                names.append(name)
                batch, count = [], 0
        return names

    async def _parent_nodes(self, tree_id: bytes | None) -> dict[bytes, Node] | None:
        if tree_id is None or self.parent_trees is None:
            return None
        try:
            return {n.name: n for n in await self.parent_trees(tree_id)}
        except Exception as exc:  # a damaged parent costs speed, never correctness
            self.warn(f"parent tree {tree_id.hex()[:16]} unreadable ({exc}); reading files again")
            return None

    # -- directories ------------------------------------------------------------------------------
    async def _dir(self, path: str, rel: str, parent: dict[bytes, Node] | None, inc: bool = False) -> bytes:
        """The tree of one directory. With `inc`, a subdirectory the changes do not touch keeps its parent
        node's subtree (the changed ones and those created or moved in are walked)."""
        async with self._dirs:
            entries, err = await self._run(_scan, path)
        if err:
            self.warn(f"{rel or '.'}: cannot list directory: {err}")
            self.stats.errors += 1
            self.sticky.add(rel)
        self.stats.dirs += 1
        here = [0, 1, 0, 0]  # this directory's own counts (files, dirs, symlinks, bytes)
        nodes: list[Node] = []
        jobs: list[FileJob] = []
        segmented: list[FileJob] = []
        subdirs: list[tuple[bytes, str, os.stat_result]] = []
        for name, st in entries:
            child_rel = f"{rel}/{os.fsdecode(name)}" if rel else os.fsdecode(name)
            if self.config.is_excluded(child_rel):
                continue
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                if self.config.one_file_system and st.st_dev != self._root_dev:
                    self.warn(f"{child_rel}: another file system, skipped (one_file_system)")
                    self.sticky.add(rel)
                    continue
                kept = self._keep(parent.get(name) if parent else None, child_rel) if inc else None
                if kept is not None:
                    nodes.append(_node(name, st, format.DIR, subtree=kept))
                    sub = self.totals[kept]
                    for i in range(4):
                        here[i] += sub[i]
                    continue
                subdirs.append((name, child_rel, st))
            elif stat.S_ISLNK(mode):
                try:
                    target = os.readlink(os.path.join(os.fsencode(path), name))
                except OSError as exc:
                    self._error(child_rel, f"cannot read link: {exc.strerror}")
                    continue
                self.stats.symlinks += 1
                here[2] += 1
                nodes.append(_node(name, st, format.SYMLINK, target=os.fsencode(target)))
            elif stat.S_ISREG(mode):
                self.stats.files += 1
                self.stats.bytes_total += st.st_size
                here[0] += 1
                here[3] += st.st_size
                page = self.config.is_page_file(child_rel)
                if page or st.st_nlink > 1:  # written through mmap or another link: no event says so
                    self.sticky.add(rel)
                prev = parent.get(name) if parent else None
                if (
                    prev is not None
                    and prev.kind == format.FILE
                    and not prev.changed
                    and _unchanged(prev, st)
                    and all(c in self.dedup for c in prev.content)  # at (or bound for) every site
                ):
                    self.stats.files_unchanged += 1
                    nodes.append(prev)
                else:
                    full = os.path.join(path, os.fsdecode(name))
                    job = FileJob(full, child_rel, st, page)
                    (segmented if job.page and st.st_size > SEGMENT else jobs).append(job)
            else:
                self.warn(f"{child_rel}: special file (device, fifo or socket) skipped")
                self.sticky.add(rel)

        async def subdir(name: bytes, child_rel: str, st: os.stat_result) -> Node:
            prev = parent.get(name) if parent else None
            sub_parent = await self._parent_nodes(prev.subtree) if prev and prev.kind == format.DIR else None
            # created or moved in: walked whole, as a full walk would (the parent's file nodes still apply)
            deep = self.inc is not None and child_rel in self.inc.changes.deep
            sub_path = os.path.join(path, os.fsdecode(name))
            sub_id = await self._dir(sub_path, child_rel, sub_parent, inc and not deep)
            sub = self.totals[sub_id]
            for i in range(4):
                here[i] += sub[i]
            return _node(name, st, format.DIR, subtree=sub_id)

        batches = routed_batches(jobs, self.dispatch.route, SMALL_FILE, BATCH_BYTES, BATCH_FILES)
        results = await _all_or_none(
            *(self._segmented(job) for job in segmented),
            *(self._files(w, batch) for w, batch in batches),
            *(subdir(*s) for s in subdirs),
        )
        for r in results:
            if isinstance(r, Node):
                nodes.append(r)
            else:
                nodes.extend(r)  # type: ignore[arg-type]
        if self.progress:
            self.progress(self.stats)
        for n in nodes:
            if n.kind == format.FILE and n.changed:  # read again next time, as a full walk would
                self.sticky.add(rel)
        tid = await self._run(self._store_tree, nodes)
        self.totals[tid] = (here[0], here[1], here[2], here[3])
        return tid

    def _keep(self, prev: Node | None, child_rel: str) -> bytes | None:
        """The parent's subtree for an untouched directory, if it can be kept as it is."""
        assert self.inc is not None
        if prev is None or prev.kind != format.DIR or child_rel in self._touched:
            return None
        sub = self.inc.totals.get(prev.subtree)
        if sub is None or prev.subtree not in self.dedup:
            return None
        self.totals[prev.subtree] = sub
        self.stats.dirs_kept += sub[1]
        self.stats.files += sub[0]
        self.stats.dirs += sub[1]
        self.stats.symlinks += sub[2]
        self.stats.bytes_total += sub[3]
        self.stats.files_unchanged += sub[0]
        return prev.subtree

    def _store_tree(self, nodes: list[Node]) -> bytes:
        data = format.encode_tree(nodes)
        tid = self.id_fn(data)
        self.trees[tid] = data
        if self.dedup.claim(tid):
            try:
                self.packer.add(BlobType.TREE, tid, data)
            except OSError as exc:
                raise SpoolWriteError(
                    f"cannot write to the spool: {exc.strerror}", path=exc.filename
                ) from exc
        return tid

    # -- files ------------------------------------------------------------------------------------
    async def _files(self, worker: int, batch: list[FileJob]) -> list[Node]:
        outs = await self.dispatch.read(worker, batch)
        self.spool.notify()  # a worker may have committed packs: wake the shippers
        return self._nodes(batch, outs)

    def _nodes(self, batch: list[FileJob], outs: list[FileOut]) -> list[Node]:
        nodes = []
        for job, out in zip(batch, outs, strict=True):
            if out.error:
                self._error(job.rel, out.error)
                continue
            assert out.st is not None
            self.stats.files_read += 1
            self.stats.bytes_read += out.bytes_read
            if out.changed:
                self.stats.changed_while_read += 1
                self.warn(f"{job.rel}: changed while it was read, twice; stored as read and marked changed")
            name = os.fsencode(os.path.basename(job.path))
            nodes.append(_node(name, out.st, format.FILE, content=out.content, changed=out.changed))
        return nodes

    async def _segmented(self, job: FileJob) -> list[Node]:
        """A large page file, read as SEGMENT-sized ranges in parallel (page-aligned: same chunks)."""
        size = job.st.st_size
        segs = [
            FileJob(job.path, job.rel, job.st, True, off, -1 if off + SEGMENT >= size else SEGMENT)
            for off in range(0, size, SEGMENT)
        ]

        async def one(seg: FileJob) -> FileOut:
            (out,) = await self.dispatch.read(self.dispatch.route(seg), [seg])
            self.spool.notify()
            return out

        outs = await asyncio.gather(*(one(s) for s in segs))
        for out in outs:
            if out.error:
                self._error(job.rel, out.error)
                return []
        last = outs[-1].st
        assert last is not None
        total = sum(o.bytes_read for o in outs)
        changed = (
            any(o.changed or o.st is None or not same_stat(o.st, last) for o in outs) or total != last.st_size
        )
        merged = FileOut(tuple(c for o in outs for c in o.content), last, changed, "", total)
        return self._nodes([job], [merged])

    def _error(self, rel: str, msg: str) -> None:
        self.stats.errors += 1
        self.sticky.add(rel.rpartition("/")[0])
        self.warn(f"{rel}: {msg}; left out of the snapshot")


async def _all_or_none(*aws: Awaitable[T]) -> list[T]:
    """Like gather, but the first failure cancels the others (and waits for them) before it propagates."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _scan(path: str) -> tuple[list[tuple[bytes, os.stat_result]], str]:
    out = []
    try:
        with os.scandir(os.fsencode(path)) as it:
            for e in it:
                try:
                    out.append((e.name, e.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue  # removed while scanning
    except OSError as exc:
        return out, exc.strerror or str(exc)
    return out, ""


def _unchanged(prev: Node, st: os.stat_result) -> bool:
    return (prev.size, prev.mtime_ns, prev.ctime_ns, prev.inode) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
    )


def _node(
    name: bytes,
    st: os.stat_result,
    kind: str,
    *,
    content: Sequence[bytes] = (),
    subtree: bytes = b"",
    target: bytes = b"",
    changed: bool = False,
) -> Node:
    return Node(
        name=name,
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        mtime_ns=st.st_mtime_ns,
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind == format.FILE else 0,
        inode=st.st_ino if kind == format.FILE else 0,
        ctime_ns=st.st_ctime_ns if kind == format.FILE else 0,
        content=tuple(content),
        subtree=subtree,
        target=target,
        changed=changed,
    )
