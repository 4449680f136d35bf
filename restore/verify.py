"""Verifying a restore: re-read what was put in the target and compare it with the repository.

A tree (and a postgres base backup):
1. Walk the snapshot's trees again (``restore.plan.build_plan``: names checked as a restore checks them).
2. Every directory, file and symlink must be there, of its kind and mode; a symlink must point where the
   snapshot says; nothing else may be in the target.
3. Every file is read back in the lengths of its chunks (the index gives each chunk's plaintext length) and
   each piece's keyed content id must be the chunk id the snapshot names, and the file must end there. The
   index is enough: no data blob is downloaded again.

A log source:
1. The chain the restore applied is walked again: its checkpoint's files are generations 0, 1, ... and the
   segments' events up to the requested point (as many segments as the restore applied) give each live
   file's path, mode and content: the checkpoint's chunks, then the bytes appended (a SHA-256 of them; the
   events are held one segment at a time).
2. Every live file is read back: its checkpoint part by chunk ids, the rest against the hash of the appends.

Reading runs in threads (a few files at a time); memory is bounded by one chunk per reader.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drsvc.core import format
from drsvc.core.errors import IntegrityError
from drsvc.core.format import Node, SnapshotRecord
from drsvc.core.repository import Repository
from drsvc.core.segments import Append, Create, Delete, Event, Move
from restore.logplan import fetch_record, list_checkpoints, list_lines, list_segments
from restore.logreplay import LogRestoreResult, _Fetcher, _pick
from restore.plan import build_plan, check_name

READ_CONCURRENCY = 4
BATCH_BYTES = 16 * 1024 * 1024  # files checked in one thread call, up to this many bytes (or BATCH_FILES)
BATCH_FILES = 256
MISMATCH_LIMIT = 1000  # mismatches kept in a report (the count goes on)

__all__ = ["Mismatch", "VerifyReport", "verify_log", "verify_tree"]


@dataclass(frozen=True)
class Mismatch:
    path: str  # relative to the target ("." for the target itself)
    problem: str


@dataclass
class VerifyReport:
    target: str
    files: int = 0  # files checked
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0  # bytes read back
    mismatches: list[Mismatch] = field(default_factory=list)
    mismatch_count: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.mismatch_count == 0

    def add(self, path: str, problem: str) -> None:
        self.mismatch_count += 1
        if len(self.mismatches) < MISMATCH_LIMIT:
            self.mismatches.append(Mismatch(path, problem))

    def to_dict(self, limit: int = 100) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "target": self.target,
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
            "bytes": self.bytes,
            "mismatch_count": self.mismatch_count,
            "mismatches": [{"path": m.path, "problem": m.problem} for m in self.mismatches[:limit]],
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _FileCheck:
    rel: str
    mode: int
    chunks: list[tuple[bytes, int]]  # (chunk id, plaintext length): the file's first part
    size: int  # the whole expected size
    tail: bytes | None = None  # SHA-256 of the bytes after the chunks (log sources), None: no tail
    longer_ok: bool = False  # the restore appended to it afterwards (postgresql.auto.conf)


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n > 0:
        b = os.read(fd, min(n, 1024 * 1024))
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def _check_file(root: str, f: _FileCheck, content_id: Callable[[bytes], bytes]) -> tuple[int, str | None]:
    """(bytes read, the problem or None)."""
    path = os.path.join(root, f.rel)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        return 0, "missing" if exc.errno == errno.ENOENT else f"cannot open: {exc.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return 0, "not a regular file"
        if st.st_size != f.size and not (f.longer_ok and st.st_size > f.size):
            return 0, f"size {st.st_size}, expected {f.size}"
        if stat.S_IMODE(st.st_mode) != f.mode & 0o7777:
            return 0, f"mode {stat.S_IMODE(st.st_mode):o}, expected {f.mode & 0o7777:o}"
        done = 0
        for i, (cid, n) in enumerate(f.chunks):
            data = _read_exact(fd, n)
            done += len(data)
            if len(data) != n:
                return done, f"ends at {done}, inside chunk {i}"
            if content_id(data) != cid:
                return done, f"content differs in chunk {i} (bytes {done - n}..{done})"
        if f.tail is not None:
            h = hashlib.sha256()
            left = f.size - done
            while left > 0:
                b = os.read(fd, min(left, 1024 * 1024))
                if not b:
                    return done, f"ends at {done}, expected {f.size}"
                h.update(b)
                done += len(b)
                left -= len(b)
            if h.digest() != f.tail:
                return done, "content appended by the change log differs"
        if not f.longer_ok and os.read(fd, 1):
            return done, f"longer than {f.size} bytes"
        return done, None
    finally:
        os.close(fd)


def _check_batch(
    root: str, batch: Sequence[_FileCheck], content_id: Callable[[bytes], bytes]
) -> list[tuple[int, str | None]]:
    return [_check_file(root, f, content_id) for f in batch]


async def _check_files(
    repo: Repository,
    root: str,
    files: Sequence[_FileCheck],
    report: VerifyReport,
    progress: Callable[[VerifyReport], None] | None,
) -> None:
    batches: list[list[_FileCheck]] = [[]]
    size = 0
    for f in files:
        if batches[-1] and (size + f.size > BATCH_BYTES or len(batches[-1]) >= BATCH_FILES):
            batches.append([])
            size = 0
        batches[-1].append(f)
        size += f.size
    sem = asyncio.Semaphore(READ_CONCURRENCY)

    async def one(batch: list[_FileCheck]) -> None:
        async with sem:
            results = await asyncio.to_thread(_check_batch, root, batch, repo.content_id)
        for f, (n, problem) in zip(batch, results, strict=True):
            report.files += 1
            report.bytes += n
            if problem is not None:
                report.add(f.rel, problem)
        if progress is not None:
            progress(report)

    await asyncio.gather(*(one(b) for b in batches if b))


async def _chunks(repo: Repository, node: Node, where: str) -> list[tuple[bytes, int]]:
    out = []
    for cid in node.content:
        out.append((cid, (await repo.locate(cid)).entry.raw_length))
    if sum(n for _, n in out) != node.size:
        raise IntegrityError("a file's chunks do not add up to its size in the snapshot", path=where)
    return out


def _unexpected(root: str, expected: set[str], allowed: Collection[str]) -> list[str]:
    """Entries under `root` that are not expected (a directory's content is not listed again)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in [*dirnames, *filenames]:
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            if rel not in expected and rel not in allowed:
                out.append(rel)
        dirnames[:] = [d for d in dirnames if (d if rel_dir == "." else os.path.join(rel_dir, d)) in expected]
    return sorted(out)


def _check_tree_shape(
    root: str,
    dirs: list[tuple[str, Node | None]],
    symlinks: list[tuple[str, Node]],
    root_node: Node | None,
    report: VerifyReport,
) -> None:
    for rel, node in dirs:
        path = os.path.join(root, rel) if rel else root
        node = node if rel else root_node
        try:
            st = os.lstat(path)
        except OSError as exc:
            report.add(rel or ".", "missing" if exc.errno == errno.ENOENT else f"cannot stat: {exc.strerror}")
            continue
        report.dirs += 1
        if not stat.S_ISDIR(st.st_mode):
            report.add(rel or ".", "not a directory")
        elif node is not None and stat.S_IMODE(st.st_mode) != node.mode & 0o7777:
            report.add(rel or ".", f"mode {stat.S_IMODE(st.st_mode):o}, expected {node.mode & 0o7777:o}")
    for rel, node in symlinks:
        path = os.path.join(root, rel)
        report.symlinks += 1
        try:
            st = os.lstat(path)
        except OSError as exc:
            report.add(rel, "missing" if exc.errno == errno.ENOENT else f"cannot stat: {exc.strerror}")
            continue
        if not stat.S_ISLNK(st.st_mode):
            report.add(rel, "not a symlink")
        elif os.readlink(os.fsencode(path)) != node.target:
            report.add(rel, "symlink points elsewhere")


async def verify_tree(
    repo: Repository,
    record: SnapshotRecord,
    target: Path,
    *,
    appended: Collection[str] = (),
    progress: Callable[[VerifyReport], None] | None = None,
) -> VerifyReport:
    """Compare `target` with snapshot `record` (module docstring). `appended`: top-level names the restore
    writes or appends to after laying down the tree (a postgres restore's ``postgresql.auto.conf`` and
    ``recovery.signal``): their snapshot content must be there, more may follow, and they may be new."""
    started = time.monotonic()
    root = str(target)
    report = VerifyReport(root)
    plan = await build_plan(repo, record)
    files = [
        _FileCheck(
            f.rel,
            f.node.mode,
            await _chunks(repo, f.node, f.rel),
            f.node.size,
            longer_ok=f.rel in appended,
        )
        for f in plan.files
    ]
    expected = {rel for rel, _ in plan.dirs if rel} | {f.rel for f in plan.files}
    expected |= {rel for rel, _ in plan.symlinks}
    await asyncio.to_thread(_check_tree_shape, root, plan.dirs, plan.symlinks, record.root, report)
    await _check_files(repo, root, files, report, progress)
    for rel in await asyncio.to_thread(_unexpected, root, expected, appended):
        report.add(rel, "not in the snapshot")
    report.mismatches.sort(key=lambda m: m.path)
    report.seconds = time.monotonic() - started
    return report


@dataclass
class _Live:
    path: bytes
    mode: int
    base: Node | None = None  # the checkpoint file it started as
    appended: int = 0
    tail: Any = field(default_factory=hashlib.sha256)


async def verify_log(
    repo: Repository,
    result: LogRestoreResult,
    *,
    progress: Callable[[VerifyReport], None] | None = None,
) -> VerifyReport:
    """Compare a log restore's target with its checkpoint and the change-log segments it applied."""
    started = time.monotonic()
    source, root = result.source, result.target
    report = VerifyReport(root)
    live: dict[int, _Live] = {}
    if result.checkpoint is not None:
        record = await fetch_record(repo, source, result.checkpoint)
        for gen, node in enumerate(await repo.read_tree(record.tree)):
            if node.kind != format.FILE:
                raise IntegrityError("a log checkpoint holds something other than a file", object=record.id)
            live[gen] = _Live(node.name, node.mode, node)
    if result.segments:
        names, _ = await list_segments(repo, source)
        checkpoints, _ = await list_checkpoints(repo, source)
        line = list_lines(names, checkpoints).get(result.stream)
        if line is None:
            raise IntegrityError("the restored stream is no longer listed at any site", object=result.stream)
        until = result.requested_ns if result.requested_ns is not None else 2**63 - 1
        fetcher = _Fetcher(repo, source)
        try:
            prev: str | None = None
            for seq in range(result.segments):
                cands = line.by_seq.get(seq)
                name = None if cands is None else await _pick(fetcher, cands, line.by_seq.get(seq + 1, []))
                if name is None:
                    raise IntegrityError(f"segment {seq} of the restored chain is gone", object=result.stream)
                _digest, seg = await fetcher.get(name)
                if seg.prev != prev:
                    raise IntegrityError("the restored chain changed since the restore", object=name)
                _apply(live, seg.events, until, name)
                prev = name
            if prev != result.last_segment:
                raise IntegrityError("the chain does not end where the restore ended", object=str(prev))
        finally:
            await fetcher.cancel()
    files = []
    for inc in live.values():
        rel = check_name(inc.path, ".")
        base = inc.base
        chunks = await _chunks(repo, base, rel) if base is not None else []
        size = (base.size if base is not None else 0) + inc.appended
        files.append(_FileCheck(rel, inc.mode, chunks, size, tail=inc.tail.digest()))
    await _check_files(repo, root, files, report, progress)
    for rel in await asyncio.to_thread(_unexpected, root, {f.rel for f in files}, ()):
        report.add(rel, "not in the change log")
    report.mismatches.sort(key=lambda m: m.path)
    report.seconds = time.monotonic() - started
    return report


def _apply(live: dict[int, _Live], events: Sequence[Event], until: int, name: str) -> None:
    for e in events:
        if e.time_ns > until:
            return
        if isinstance(e, Create):
            live[e.gen] = _Live(e.path, e.mode)
            continue
        inc = live.get(e.gen)
        if inc is None:
            raise IntegrityError(f"event for generation {e.gen}, which does not exist", object=name)
        if isinstance(e, Append):
            inc.tail.update(e.data)
            inc.appended += len(e.data)
        elif isinstance(e, Move):
            inc.path = e.path
        elif isinstance(e, Delete):
            del live[e.gen]
