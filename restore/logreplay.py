"""Point-in-time restore of a `log` source: its newest checkpoint at or before T, then its change log.

1. List the source's segments and checkpoints at every site (``restore.logplan``); choose the newest stream
   that had started by the requested time T (at its checkpoint's time, or its first event).
2. A checkpoint the stream starts from is restored first, as a tree restore writes files (verified ranged
   reads); its i-th file, in name order, is the stream's generation i.
3. Walk the stream's sequence numbers from 0. A sequence number cut twice (a crash between spooling a segment
   and saving the position) has two candidates; the chain decides: the one its successor names, else the
   newest.
4. Fetch each segment through ``Repository.fetch`` (another site on a missing or corrupt copy, reported),
   verify it (AEAD with its name, codec, fields; it matches its name and source) and the chain (its ``prev``
   is the segment applied before, ``prev_digest`` that one's keyed content id; segment 0 names the
   checkpoint restored, if any).
5. Apply its events up to T in order into a staging area next to the target: each file incarnation is a
   file of its own, written with pwrite at its offset, which must be its length so far; a DELETE removes it.
   Event times only go up, so a segment whose last event is at or after T ends the replay.
6. A sequence number missing at every site (or unreadable at every site, or a broken chain) stops the replay
   there: what came before is restored and the result names the gap (``LogRestoreResult.gap``); with
   ``partial_ok=False``, or when nothing at all could be restored, ``LogGapError`` is raised and nothing is
   written.
7. Each live incarnation is renamed to its path (each path must be held by one), its mode and mtime set;
   the staging directory is synced and renamed onto the target, as a tree restore does.
8. Progress (``LogProgress``, a ``restore.Progress`` with segment counts) is reported on the event loop:
   the checkpoint's bytes as they are written, then after each segment; totals are estimates (the
   checkpoint's size plus the mean data of the segments applied so far times the segments left) until the
   last report, where every total equals what was restored.
9. Every blocking step runs behind the restore's fence (``restore.Staging``): on a failure or cancellation
   nothing writes any more before the staging and scratch directories are removed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drsvc.core import format
from drsvc.core.errors import DRError, IntegrityError, RestoreError, StoreError
from drsvc.core.format import SnapshotRecord
from drsvc.core.repository import Fallback, Repository
from drsvc.core.segments import Append, Create, Delete, Move, Segment, SegmentName
from restore import Staging, _check_target
from restore.logplan import (
    Line,
    LogRange,
    choose_line,
    fetch_record,
    fetch_segment,
    list_checkpoints,
    list_lines,
    list_segments,
    restorable_range,
)
from restore.plan import FilePlan, Plan, check_name
from restore.writer import BlobWriter, Fence, Progress

PREFETCH = 4  # segments fetched ahead of the one being applied (each at most segment_max plaintext)

__all__ = [
    "LogGap",
    "LogGapError",
    "LogProgress",
    "LogRange",
    "LogRestoreResult",
    "restorable_range",
    "restore_log",
]


@dataclass(frozen=True)
class LogGap:
    """Where a replay had to stop: segments of the chain that no site holds intact."""

    stream: str
    after: str | None  # the last segment applied (None: the stream's first segment is missing)
    after_seq: int  # its sequence number (-1 when None)
    after_ns: int  # the time of its last event (or of the checkpoint): later changes are not restored
    checkpoint: str | None  # the checkpoint the stream starts from, if one was restored
    missing_from: int  # first missing sequence number
    missing_to: int  # last missing sequence number
    before: str | None  # the first segment after the gap, if any site holds one
    before_ns: int | None  # the time of its first event: the gap ends before this
    reason: str

    def describe(self) -> str:
        seqs = (
            f"segment {self.missing_from}"
            if self.missing_to == self.missing_from
            else f"segments {self.missing_from}..{self.missing_to}"
        )
        if self.after:
            after = f"after {self.after} (ends {_iso(self.after_ns)})"
        elif self.checkpoint:
            after = f"right after checkpoint {self.checkpoint} ({_iso(self.after_ns)})"
        else:
            after = "at the stream's start"
        before = f", before {self.before} (starts {_iso(self.before_ns)})" if self.before else ""
        return f"stream {self.stream}: {seqs} {after}{before}: {self.reason}"


class LogGapError(RestoreError):
    """The change log has a hole before the requested point and the restore was not allowed to stop at it."""

    hint = (
        "the named segments are lost at every site: restore to a time before the gap, or accept the "
        "partial restore; run `drsvc check` to see what each site holds"
    )

    def __init__(self, message: str, gap: LogGap, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.gap = gap


@dataclass
class LogProgress(Progress):
    """A log restore's progress: a tree restore's fields (files and bytes; the totals are estimates until
    the last report) and the change-log segments."""

    segments_total: int = 0
    segments_done: int = 0


@dataclass
class LogRestoreResult:
    source: str
    target: str
    site: str
    requested_ns: int | None
    restored_ns: int  # the recovery point: the time of the last event applied
    latest_ns: int  # the newest event time the stream holds (restored_ns when the restore reached the end)
    stream: str
    checkpoint: str | None  # the checkpoint the replay started from (None: the stream's start)
    segments: int  # segments applied
    last_segment: str
    files: int
    bytes: int
    seconds: float
    gap: LogGap | None = None
    fallbacks: list[Fallback] = field(default_factory=list)
    bytes_fetched: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def recovery_point_ns(self) -> int:
        return self.restored_ns

    @property
    def reached_latest(self) -> bool:
        """The request was at or past the newest protected point: the latest state was restored."""
        return self.gap is None and self.restored_ns >= self.latest_ns

    @property
    def rpo_achieved_s(self) -> float | None:
        """Requested point minus restored point (None for 'latest')."""
        if self.requested_ns is None:
            return None
        return max(0, self.requested_ns - self.restored_ns) / 1e9


@dataclass
class _Incarnation:
    path: bytes
    mode: int
    length: int = 0
    mtime_ns: int = 0


class _Replay:
    """The directory being rebuilt: one data file per live incarnation, under `gens` (blocking methods)."""

    def __init__(self, gens: str, fence: Fence) -> None:
        self.gens = gens
        self.fence = fence  # checked before each event and each file: a stopped restore stops writing
        self.live: dict[int, _Incarnation] = {}
        self.dead: set[int] = set()
        self.bytes = 0
        self.base_bytes = 0  # of these, the checkpoint's

    def _file(self, gen: int) -> str:
        return os.path.join(self.gens, str(gen))

    def apply(self, seg: Segment, name: str, until_ns: int) -> int:
        """Apply the events at or before `until_ns`; the time of the last one applied (0: none)."""
        fds: dict[int, int] = {}
        last = 0
        try:
            for e in seg.events:
                if e.time_ns > until_ns:
                    break
                self.fence.check()
                if isinstance(e, Create):
                    if e.gen in self.live or e.gen in self.dead:
                        raise IntegrityError(f"generation {e.gen} created twice", object=name)
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                    os.close(os.open(self._file(e.gen), flags, 0o600))
                    self.live[e.gen] = _Incarnation(e.path, e.mode, 0, e.time_ns)
                else:
                    inc = self.live.get(e.gen)
                    if inc is None:
                        raise IntegrityError(
                            f"event for generation {e.gen}, which does not exist", object=name
                        )
                    if isinstance(e, Append):
                        if e.offset != inc.length:
                            raise IntegrityError(
                                f"append at offset {e.offset} of generation {e.gen}, which holds "
                                f"{inc.length} bytes",
                                object=name,
                            )
                        fd = fds.get(e.gen)
                        if fd is None:
                            fd = fds[e.gen] = os.open(self._file(e.gen), os.O_WRONLY | os.O_NOFOLLOW)
                        if os.pwrite(fd, e.data, e.offset) != len(e.data):
                            raise OSError(errno.ENOSPC, "short write", self._file(e.gen))
                        inc.length += len(e.data)
                        inc.mtime_ns = e.time_ns
                        self.bytes += len(e.data)
                    elif isinstance(e, Move):
                        inc.path = e.path
                    elif isinstance(e, Delete):
                        fd = fds.pop(e.gen, None)
                        if fd is not None:
                            os.close(fd)
                        os.unlink(self._file(e.gen))
                        del self.live[e.gen]
                        self.dead.add(e.gen)
                last = e.time_ns
        finally:
            for fd in fds.values():
                os.close(fd)
        return last

    def finish(self, staging: str) -> int:
        """Put every live incarnation at its path in `staging`; the number of files."""
        paths: dict[bytes, int] = {}
        for gen, inc in self.live.items():
            if inc.path in paths:
                raise IntegrityError(
                    f"generations {paths[inc.path]} and {gen} both claim {inc.path!r}", object="change log"
                )
            paths[inc.path] = gen
        os.sync()  # one flush for every written byte before anything counts as restored
        for gen, inc in self.live.items():
            self.fence.check()
            dest = os.path.join(staging, check_name(inc.path, "."))
            os.rename(self._file(gen), dest)
            os.chmod(dest, inc.mode & 0o7777, follow_symlinks=False)
            os.utime(dest, ns=(inc.mtime_ns, inc.mtime_ns), follow_symlinks=False)
        return len(self.live)


class _Fetcher:
    """Segments fetched ahead (bounded), each task started once."""

    def __init__(self, repo: Repository, source: str) -> None:
        self.repo = repo
        self.source = source
        self.tasks: dict[str, asyncio.Future[tuple[bytes, Segment]]] = {}

    def start(self, name: str) -> asyncio.Future[tuple[bytes, Segment]]:
        task = self.tasks.get(name)
        if task is None:
            task = self.tasks[name] = asyncio.ensure_future(fetch_segment(self.repo, self.source, name))
        return task

    async def get(self, name: str) -> tuple[bytes, Segment]:
        try:
            return await self.start(name)
        finally:
            self.tasks.pop(name, None)

    async def cancel(self) -> None:
        for t in self.tasks.values():
            t.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()


async def restore_log(
    repo: Repository,
    source: str,
    target: Path,
    at_ns: int | None = None,
    progress: Callable[[LogProgress], None] | None = None,
    *,
    partial_ok: bool = True,
) -> LogRestoreResult:
    """Restore log source `source` as it was at `at_ns` (None: the latest) into `target` (absent or empty).

    Raises RestoreError when the source has nothing at or before `at_ns`, LogGapError when a gap leaves
    nothing to restore (or any gap, with ``partial_ok=False``), IntegrityError for a malformed change log.
    """
    started = time.monotonic()
    target = await asyncio.to_thread(target.absolute)
    await asyncio.to_thread(_check_target, target)
    names, warnings = await list_segments(repo, source)
    checkpoints, more = await list_checkpoints(repo, source)
    warnings += more
    lines = list_lines(names, checkpoints)
    line = choose_line(lines, at_ns)
    if line is None:
        raise RestoreError(
            "the source has no change-log segment or checkpoint at or before the requested time"
            if lines
            else "the source has no change-log segments or checkpoints at any site",
            source=source,
            hint="`drsvc ls` shows the restorable range",
        )
    until = at_ns if at_ns is not None else 2**63 - 1
    newest = max([ln.start_ns for ln in lines.values()] + [n.first_ns for n in names])
    report = _Report(
        LogProgress(segments_total=sum(1 for c in line.by_seq.values() if c[0].first_ns <= until)), progress
    )
    staging = await Staging.create(target, scratch=("gens",))
    fetcher = _Fetcher(repo, source)
    async with staging.undone_on_failure():
        try:
            replay = _Replay(str(staging.scratch[0]), staging.fence)
            walk = _Walk()
            if line.checkpoint is not None:
                await _load_checkpoint(repo, line.checkpoint, replay, report)
                walk.base, walk.restored_ns = line.checkpoint.id, line.checkpoint.time_ns
            await _walk(fetcher, replay, walk, line, until, report)
            if walk.gap is not None and (not partial_ok or not walk.restored_ns):
                raise LogGapError(
                    f"the change log has a gap: {walk.gap.describe()}",
                    walk.gap,
                    source=source,
                    restored="nothing" if not walk.restored_ns else "nothing (partial restores refused)",
                )
            files = await staging.fence.run(replay.finish, str(staging.path))
            await staging.fence.run(staging.move_into_place, None)
        finally:
            await fetcher.cancel()
    await staging.discard_scratch()
    report.done(files, replay.bytes)
    return LogRestoreResult(
        source=source,
        target=str(target),
        site=repo.stores[0].name,
        requested_ns=at_ns,
        restored_ns=walk.restored_ns,
        latest_ns=max(walk.restored_ns, walk.latest_ns, newest if walk.gap is None else 0),
        stream=line.stream,
        checkpoint=walk.base,
        segments=walk.applied,
        last_segment=walk.last_name or "",
        files=files,
        bytes=replay.bytes,
        seconds=time.monotonic() - started,
        gap=walk.gap,
        fallbacks=list(repo.report.fallbacks),
        bytes_fetched=repo.report.bytes_fetched,
        warnings=warnings,
    )


async def _load_checkpoint(
    repo: Repository, record: SnapshotRecord, replay: _Replay, report: _Report
) -> None:
    """The checkpoint's files become generations 0, 1, ... (its tree's name order), written as a tree
    restore writes files: ranged reads of verified blobs, pwrite at their offsets."""
    nodes = await repo.read_tree(record.tree)
    plan = Plan(record)
    plan.dirs.append(("", None))
    for gen, node in enumerate(nodes):
        if node.kind != format.FILE:
            raise IntegrityError("a log checkpoint holds something other than a file", object=record.id)
        check_name(node.name, ".")
        replay.live[gen] = _Incarnation(node.name, node.mode, node.size, node.mtime_ns)
        plan.files.append(FilePlan(str(gen), node))
        plan.total_bytes += node.size

    def create() -> None:
        for f in plan.files:
            replay.fence.check()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            os.close(os.open(os.path.join(replay.gens, f.rel), flags, 0o600))

    def sizes_match() -> bool:
        return all(os.stat(os.path.join(replay.gens, f.rel)).st_size == f.node.size for f in plan.files)

    await replay.fence.run(create)
    await BlobWriter(repo, plan, replay.gens, progress=report.checkpoint, fence=replay.fence).run()
    if not await replay.fence.run(sizes_match):
        raise IntegrityError("a checkpoint file's chunks do not add up to its size", object=record.id)
    replay.bytes += plan.total_bytes
    replay.base_bytes += plan.total_bytes


class _Report:
    """The log restore's progress, reported on the event loop (module docstring, step 8)."""

    def __init__(self, prog: LogProgress, callback: Callable[[LogProgress], None] | None) -> None:
        self.prog = prog
        self.callback = callback

    def _send(self) -> None:
        if self.callback is not None:
            self.callback(self.prog)

    def checkpoint(self, p: Progress) -> None:
        """The checkpoint's files are written (a BlobWriter's progress)."""
        self.prog.files_total = p.files_total
        self.prog.bytes_done = p.bytes_done
        self.prog.bytes_total = max(self.prog.bytes_total, p.bytes_total)
        self._send()

    def segment(self, replay: _Replay) -> None:
        """One more segment applied: the totals are estimated from the segments applied so far."""
        p = self.prog
        p.segments_done += 1
        p.bytes_done = replay.bytes
        left = max(0, p.segments_total - p.segments_done)
        p.bytes_total = replay.bytes + (replay.bytes - replay.base_bytes) * left // p.segments_done
        p.files_total = len(replay.live)
        self._send()

    def done(self, files: int, nbytes: int) -> None:
        """The last report: what was restored, every total equal to its count."""
        p = self.prog
        p.files_total = p.files_done = files
        p.bytes_total = p.bytes_done = nbytes
        p.segments_total = p.segments_done
        self._send()


@dataclass
class _Walk:
    base: str | None = None  # the checkpoint loaded
    applied: int = 0
    restored_ns: int = 0
    latest_ns: int = 0  # the newest event time seen in the stream (a lower bound when stopped early)
    last_name: str | None = None
    last_seq: int = -1
    last_end_ns: int = 0
    gap: LogGap | None = None


async def _walk(
    fetcher: _Fetcher,
    replay: _Replay,
    w: _Walk,
    line: Line,
    until: int,
    report: _Report,
) -> None:
    by_seq, stream = line.by_seq, line.stream
    if w.base is not None:
        w.last_end_ns = w.restored_ns
    digest = b""
    top = max(by_seq, default=-1)
    seq = 0
    while seq <= top:
        cands = by_seq.get(seq)
        if cands is None:
            w.gap = _gap(w, stream, by_seq, seq, "missing at every site")
            return
        for ahead in range(seq + 1, seq + 1 + PREFETCH):  # keep the fetches ahead busy
            for c in by_seq.get(ahead, ()):
                if c.first_ns <= until:
                    fetcher.start(str(c))
        try:
            name = await _pick(fetcher, cands, by_seq.get(seq + 1, []))
        except DRError as exc:
            w.gap = _gap(w, stream, by_seq, seq, _why(exc))
            return
        if name is None:
            w.gap = _gap(w, stream, by_seq, seq, "no segment continues the chain (prev does not match)")
            return
        first = SegmentName.parse(name).first_ns
        if first > until:  # the chain goes on after the requested point: what is applied is the answer
            w.latest_ns = max(w.latest_ns, first)
            return
        try:
            seg_digest, seg = await fetcher.get(name)
        except DRError as exc:
            w.gap = _gap(w, stream, by_seq, seq, _why(exc))
            return
        if seq == 0 and seg.base != w.base:
            if w.base is not None or seg.base is None:
                w.gap = _gap(w, stream, by_seq, seq, "chain broken: segment 0 names another checkpoint")
                return
            try:  # its checkpoint was not listed (or not readable): ask every site for it by name
                record = await fetch_record(fetcher.repo, fetcher.source, seg.base)
                await _load_checkpoint(fetcher.repo, record, replay, report)
            except DRError as exc:
                w.gap = _gap(w, stream, by_seq, seq, f"its checkpoint {seg.base} is lost ({exc.message})")
                return
            w.base, w.restored_ns = record.id, record.time_ns
        if seg.prev != w.last_name or seg.prev_digest != digest:
            w.gap = _gap(w, stream, by_seq, seq, "chain broken: the segment's predecessor does not match")
            return
        last = await replay.fence.run(replay.apply, seg, name, until)
        w.applied += 1
        w.restored_ns = max(w.restored_ns, last)
        w.latest_ns = max(w.latest_ns, seg.last_ns)
        w.last_name, w.last_seq, w.last_end_ns, digest = name, seq, seg.last_ns, seg_digest
        report.segment(replay)
        if seg.last_ns >= until:
            return  # event times only go up: nothing later is at or before `until`
        seq += 1


async def _pick(fetcher: _Fetcher, cands: list[SegmentName], successors: list[SegmentName]) -> str | None:
    """The candidate for one sequence number: the only one; else the one the successor (newest first)
    names; else the newest. None if a successor exists but names none of them."""
    if len(cands) == 1:
        return str(cands[0])
    names = {str(c) for c in cands}
    for succ in sorted(successors, reverse=True):
        try:
            _d, seg = await fetcher.get(str(succ))
        except DRError:
            continue
        fetcher.tasks[str(succ)] = _done((_d, seg))  # keep it for when its turn comes
        if seg.prev in names:
            return seg.prev
    if successors:
        return None
    return str(max(cands))


def _done(value: tuple[bytes, Segment]) -> asyncio.Future[tuple[bytes, Segment]]:
    f: asyncio.Future[tuple[bytes, Segment]] = asyncio.get_running_loop().create_future()
    f.set_result(value)
    return f


def _why(exc: DRError) -> str:
    if isinstance(exc, StoreError):
        return f"missing at every site ({exc.message})"
    return f"no intact copy at any site ({exc.message})"


def _gap(w: _Walk, stream: str, by_seq: dict[int, list[SegmentName]], seq: int, reason: str) -> LogGap:
    later = sorted(s for s in by_seq if s > seq)
    nxt = min(by_seq[later[0]]) if later else None
    missing_to = (later[0] - 1) if later and seq not in by_seq else seq
    return LogGap(
        stream=stream,
        after=w.last_name,
        after_seq=w.last_seq,
        after_ns=w.last_end_ns,
        checkpoint=w.base,
        missing_from=seq,
        missing_to=missing_to,
        before=str(nxt) if nxt is not None else None,
        before_ns=nxt.first_ns if nxt is not None else None,
        reason=reason,
    )


def _iso(ns: int | None) -> str:
    if not ns:
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns % 10**9 // 10**6:03d}Z"
