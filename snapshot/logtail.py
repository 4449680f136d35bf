"""The `log` source: tail a directory of append-only files into hash-chained change-log segments.

1. Wake on inotify (the directory only, not its subdirectories: log directories are flat) or, when inotify is
   unavailable or out of watches, every poll interval; rescan the whole directory on structural events
   (create, rename, delete), on a queue overflow and every RESCAN_INTERVAL anyway.
2. A cut, in a worker thread: files are tracked by (st_dev, st_ino). A tracked file under a new name is a
   MOVE (rotation); a new inode is a CREATE (a new file, or one renamed over another); a tracked file gone
   from the directory has its last bytes read through the descriptor still held, then a DELETE; a file
   smaller than what was sent, or whose last sent bytes changed, was truncated or rewritten: DELETE and a
   CREATE of a new generation, sent again from offset 0. Structural events of one scan share one time.
3. New bytes are read with pread from the tracked descriptor and stamped with the time after the read, so a
   restore at T never contains a byte written after T.
4. Events fill a segment up to `segment_max` data bytes; a full segment (or the end of the cut) is encoded,
   compressed, sealed, spooled (fsync) and only then is the position saved (temp, fsync, rename), so a crash
   re-sends at most one segment, under the same sequence number and a new name (restore picks the one the
   chain continues from).
5. Cuts are eager (group commit): the next cut starts as soon as the previous one is spooled and something
   changed, never later than the poll interval (at most `sync_interval`) in polling mode.
6. Every `interval` (and at once for a fresh stream) a checkpoint (``snapshot.logcheckpoint``) describes the
   bytes sent so far as a tree snapshot; a new stream starts from it, its generations renumbered in the
   checkpoint's name order. Segments before it are then needed only for points before it.
The position (``snapshot.logstate``) and the inotify watch (``snapshot.logwatch``) have modules of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from drsvc.core import segments
from drsvc.core.config import SourceConfig
from drsvc.core.errors import DRError, SnapshotError
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import Repository
from drsvc.core.segments import Append, Create, Delete, Event, Move, Segment, SegmentName
from drsvc.core.spool import Spool
from drsvc.core.stores import ReadStore
from snapshot.dedup import DedupIndex
from snapshot.logcheckpoint import CheckpointAborted, CheckpointFile, CheckpointResult, build_checkpoint
from snapshot.logstate import Position, TrackedFile, load_position, save_position
from snapshot.logwatch import Watch

POLL_MAX = 0.25  # polling fallback: stat every file at least this often (and at least every sync_interval)
RESCAN_INTERVAL = 10.0  # with inotify: a full rescan this often anyway (events lost on some file systems)
MAX_OPEN = 256  # descriptors kept open on tracked files; the least recently grown are closed beyond this
TAIL = 64  # last bytes sent of each file, compared before each read: a rewrite shows as a mismatch
_READ_CHUNK = 4 * 1024 * 1024
CHECKPOINT_RETRY = 60.0  # a failed checkpoint is tried again this much later (or at the interval if sooner)
SEGMENTS_PER_CUT = 4  # a cut hands back to the loop after this many segments (stop is seen, state saved)


@dataclass(frozen=True)
class SpooledSegment:
    """One segment durable in the spool: what the supervisor needs to track protection and lag."""

    source: str
    key: str  # store key, as in the outbox
    name: str
    stream: str
    seq: int
    first_ns: int  # time of its first event
    last_ns: int  # time of its last event
    data_bytes: int  # appended file bytes it carries
    size: int  # sealed size
    spooled_ns: int  # when it became durable in the spool
    # every change made before this time is in this segment or an earlier one: what protection may claim
    # once it is at min_copies sites (not last_ns: an append that finished between a file's size being read
    # and the event being stamped is in the next segment)
    covers_ns: int = 0


class _Builder:
    """The segment being filled: events in time order, at most `limit` data bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.events: list[Event] = []
        self.data = 0

    @property
    def room(self) -> int:
        return max(0, self.limit - self.data)

    def add(self, e: Event) -> None:
        self.events.append(e)
        if isinstance(e, Append):
            self.data += len(e.data)


class LogStreamer:
    """Tails one `log` source into the spool. ``run(stop)`` in the daemon; ``cut_once()`` in tests.

    `on_segment` is called from the cutting thread after each segment is durable in the spool and the
    position saved (like ``Spool.subscribe``); use ``loop.call_soon_threadsafe`` to reach the event loop.
    """

    def __init__(
        self,
        source: str,
        config: SourceConfig,
        repo: Repository,
        spool: Spool,
        state_dir: Path,
        *,
        on_segment: Callable[[SpooledSegment], None] | None = None,
        executor: Executor | None = None,
        clock: Callable[[], int] = time.time_ns,
        inotify: bool = True,
        checkpoint_stores: Sequence[ReadStore] = (),
        cache_dir: Path | None = None,
        on_checkpoint: Callable[[CheckpointResult], None] | None = None,
    ) -> None:
        if config.type != "log":
            raise SnapshotError("not a log source", source=source)
        self.source = source
        self.config = config
        self.repo = repo
        self.spool = spool
        self.dir = config.path
        self.sites = list(config.sites)
        self.tag = repo.keys.source_tag(source)
        self.state_path = state_dir / "logs" / f"{source}.json"
        self.on_segment = on_segment
        self.executor = executor
        self.inotify = inotify  # False: poll (e.g. NFS, where inotify does not see other hosts' writes)
        # checkpoints (``checkpoint()``, and every `interval` in ``run``) need the source's sites, for the
        # dedup index, and the cache directory of the tenants' index objects (<state.dir>/cache)
        self.checkpoint_stores = list(checkpoint_stores)
        self.cache_dir = cache_dir
        self.on_checkpoint = on_checkpoint
        self.checkpoint_warnings: list[str] = []
        self._clock_source = clock
        self._cctx = zstandard.ZstdCompressor(level=repo.params.compression_level)
        self._lock = asyncio.Lock()
        self._dirfd: int | None = None
        self._listed = False  # a full scan has matched the tracked files to the directory
        self._cuts = 0
        self.mode = "idle"  # "inotify" or "polling" while run() runs
        self.warnings: list[str] = []
        self.last_error: str | None = None
        self.caught_up_ns = 0  # every change before this time is in a spooled segment
        self.pos = self._load()
        # inotify's pending changes (set on the event loop, taken by each cut)
        self._names: set[bytes] = set()
        self._full = True
        self._wake = asyncio.Event()

    # -- position -----------------------------------------------------------------------------------
    def _load(self) -> Position:
        try:
            pos = load_position(self.state_path, self.source)
        except (ValueError, KeyError, TypeError) as exc:
            self.warnings.append(f"position file {self.state_path} unreadable ({exc}): a new stream starts")
            pos = None
        # no position: a new stream, every file sent again from its start (restore replays from here)
        return pos if pos is not None else Position(segments.new_stream_id())

    def _save(self) -> None:
        save_position(self.state_path, self.pos, self.source)

    def _reset(self) -> None:
        """After a failed cut: forget what was read but not spooled (it is read again)."""
        self._close_all()
        self.pos = self._load()
        self._listed = False

    def _close_all(self) -> None:
        for f in self.pos.files.values():
            if f.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(f.fd)
                f.fd = None
        if self._dirfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._dirfd)
            self._dirfd = None

    def close(self) -> None:
        self._close_all()

    def _now(self) -> int:
        """Event times only go up, also across restarts and a clock stepped back: a restore at a segment's
        last time is then exact (the next segment starts later)."""
        t = max(self._clock_source(), self.pos.time_ns + 1)
        self.pos.time_ns = t
        return t

    # -- the loop -----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Tail until `stop` is set, then cut once more (what was written before the stop is spooled).

        A cut that fails (the directory is gone, the spool is full) is recorded in ``last_error`` and tried
        again after `sync_interval`; nothing read by it is lost, since the position is saved only after a
        segment is spooled."""
        loop = asyncio.get_running_loop()
        watch = self._open_watch()
        if watch is not None:
            loop.add_reader(watch.fileno(), self._on_inotify, watch)
            self.mode = "inotify"
        else:
            self.mode = "polling"
        poll = min(self.config.sync_interval, POLL_MAX)
        next_full = time.monotonic()
        checkpoints = bool(self.checkpoint_stores) and self.cache_dir is not None
        every = self.config.interval or 3600.0
        fresh = self.pos.seq == 0 and self.pos.base is None and not self.pos.files
        next_cp = time.monotonic() + (0.0 if fresh else every)
        try:
            while True:
                final = stop.is_set()  # a cut begun after the stop sees everything written before it
                if checkpoints and time.monotonic() >= next_cp and not final:
                    try:
                        await self.checkpoint()
                        next_cp = time.monotonic() + every
                    except (OSError, DRError) as exc:
                        self.last_error = f"checkpoint: {exc}"
                        next_cp = time.monotonic() + min(every, CHECKPOINT_RETRY)
                mark = self._clock_source()
                if watch is not None:
                    self._on_inotify(watch)  # drain: every write finished before `mark` is now known
                full = watch is None or self._full or time.monotonic() >= next_full
                names, self._names, self._full = self._names, set(), False
                self._wake.clear()
                if full:
                    next_full = time.monotonic() + RESCAN_INTERVAL
                try:
                    more = await self._cut(full, names, mark)
                    self.last_error = None
                except (OSError, SnapshotError) as exc:
                    self.last_error = str(exc)
                    self._full, more = True, False
                    if stop.is_set():
                        raise
                    await _wait_any(stop, None, self.config.sync_interval)
                    continue
                if more:
                    self._full = True  # the rest of a long cut: read every file again
                    continue
                if final:
                    break
                if stop.is_set():
                    continue
                if self._wake.is_set() or self._names or self._full:
                    continue  # group commit: changes arrived while the last segment was spooled
                timeout = poll if watch is None else max(0.0, next_full - time.monotonic())
                if checkpoints:
                    timeout = min(timeout, max(0.0, next_cp - time.monotonic()))
                await _wait_any(stop, self._wake, timeout)
        finally:
            if watch is not None:
                loop.remove_reader(watch.fileno())
                watch.close()
            self.mode = "idle"
            await self._in_thread(self._close_all)

    def _open_watch(self) -> Watch | None:
        if not self.inotify:
            return None
        watch, why = Watch.open(self.dir)
        if watch is None:
            self.warnings.append(
                f"{why}: polling the directory every {min(self.config.sync_interval, POLL_MAX):g} s"
            )
        return watch

    def _on_inotify(self, watch: Watch) -> None:
        """On the event loop: only file names and flags, never file data."""
        names, structural = watch.read()
        self._names |= names
        self._full = self._full or structural
        self._wake.set()

    async def cut_once(self) -> list[SpooledSegment]:
        """Scan the whole directory and spool every new byte (as many segments as needed)."""
        out: list[SpooledSegment] = []
        while await self._cut(True, set(), self._clock_source(), out):
            pass
        return out

    async def _cut(
        self, full: bool, names: set[bytes], mark: int, out: list[SpooledSegment] | None = None
    ) -> bool:
        result: bool = await self._guarded(self._cut_sync, full, names, mark, out)
        return result

    async def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` in a worker thread, one at a time; after a failure the position is read back from
        disk (what was read but not spooled is read again)."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self.executor, functools.partial(fn, *args))
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                # a thread cannot be interrupted: let it finish (what it spooled, it also saved)
                await asyncio.wait([fut])
                if not fut.cancelled() and fut.exception() is not None:
                    await self._in_thread(self._reset)
                raise
            except Exception:
                await self._in_thread(self._reset)
                raise

    # -- checkpoints ----------------------------------------------------------------------------------
    async def checkpoint(self) -> CheckpointResult:
        """Spool a checkpoint of every byte sent so far (a tree snapshot record), then start a new stream
        from it. A fresh stream (nothing spooled yet) is checkpointed from the files as they are, so a new
        host or a lost state directory sends deduplicated chunks instead of whole files as segments."""
        if not self.checkpoint_stores or self.cache_dir is None:
            raise SnapshotError(
                "checkpoints need the source's sites and a cache directory", source=self.source
            )
        dedup, warnings = await DedupIndex.load(
            self.repo, self.checkpoint_stores, self.spool, self.cache_dir / self.repo.tenant / "index"
        )
        self.checkpoint_warnings = warnings
        result: CheckpointResult = await self._guarded(self._checkpoint_sync, dedup)
        return result

    def _checkpoint_sync(self, dedup: DedupIndex) -> CheckpointResult:
        p = self.pos
        if p.seq == 0 and p.base is None and not p.files:  # a fresh stream: adopt the files as they are
            self._adopt(self._list())
            at = self._now()
        else:  # bring every file up to date in segments, then describe exactly what they hold
            out: list[SpooledSegment] = []
            while True:
                mark = self._clock_source()
                if not self._cut_sync(True, set(), mark, out):
                    break
            at = max(mark, p.time_ns)  # no bytes after the final cut's mark were read: exact at `at`
        files = sorted(p.files.values(), key=lambda f: f.path)
        parts = []
        for f in files:
            fd = self._fd(f)
            if fd is None:
                raise CheckpointAborted("a file moved as the checkpoint began", source=self.source)
            parts.append(CheckpointFile(f.path, fd, f.offset, f.tail, f.mode, f.mtime_ns, f.chunks))
        new_stream = segments.new_stream_id()
        stats = {
            "log_stream": int(new_stream, 16),
            "log_prev_stream": int(p.stream, 16),
            "log_prev_seq": p.seq - 1,
        }
        res = build_checkpoint(self.repo, self.spool, self.sites, dedup, self.source, parts, at, stats)
        for i, f in enumerate(files):  # generation i of the new stream is the checkpoint's i-th file
            f.gen = i
            f.chunks = res.chunks[f.path]
        p.stream, p.seq, p.last, p.digest = new_stream, 0, None, b""
        p.gen_next, p.base, p.time_ns = len(files), res.record.id, max(p.time_ns, at)
        self._save()
        self.caught_up_ns = max(self.caught_up_ns, at)
        if self.on_checkpoint is not None:
            self.on_checkpoint(res)
        return res

    def _adopt(self, listing: dict[bytes, os.stat_result]) -> None:
        """Track every listed file at its current size without sending anything (a checkpoint follows)."""
        for name, st in sorted(listing.items()):
            f = TrackedFile(st.st_dev, st.st_ino, 0, name, st.st_size, mode=stat.S_IMODE(st.st_mode))
            f.mtime_ns = st.st_mtime_ns
            self.pos.files[_key(st)] = f
            fd = self._fd(f)
            if fd is not None:
                f.tail = os.pread(fd, min(TAIL, f.offset), max(0, f.offset - TAIL))
        self._listed = True

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    # -- one cut (worker thread) ----------------------------------------------------------------------
    def _cut_sync(self, full: bool, names: set[bytes], mark: int, out: list[SpooledSegment] | None) -> bool:
        """One cut; `mark`: every write finished before it is read by this cut. Returns True when it stopped
        after SEGMENTS_PER_CUT segments with bytes still waiting."""
        self._cuts += 1
        b = _Builder(self.config.segment_max)
        spooled: list[SpooledSegment] = []
        listing: dict[bytes, os.stat_result] | None = None
        if full or not self._listed or self._dirfd is None or not self._check_names(names):
            listing = self._list()
            self._reconcile(listing, b, spooled)
            self._listed = True
            todo = list(self.pos.files.values())
        else:
            by_path = {f.path: f for f in self.pos.files.values()}
            todo = [by_path[n] for n in sorted(names) if n in by_path]
        more = False
        for f in sorted(todo, key=lambda f: f.path):
            st = listing.get(f.path) if listing is not None else None
            if not self._read_new(f, st, b, spooled, may_stop=True):
                more = True
                break
        if b.events:  # the cut's last segment: with nothing left waiting, every write before `mark` is in
            self._flush(b, spooled, covers=self.caught_up_ns if more else mark)
        self._close_idle()
        if not more:
            self.caught_up_ns = max(self.caught_up_ns, mark)
        if out is not None:
            out.extend(spooled)
        return more

    def _list(self) -> dict[bytes, os.stat_result]:
        """The directory's regular files (not excluded), by name; the directory is opened afresh, so one
        replaced under the same path is followed."""
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None
        try:
            self._dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapshotError(
                f"cannot open the log directory: {exc.strerror}",
                source=self.source,
                path=str(self.dir),
                hint="check sources.<name>.path and the daemon's permissions",
            ) from None
        out: dict[bytes, os.stat_result] = {}
        with os.scandir(self._dirfd) as it:
            for e in it:
                if self.config.is_excluded(e.name):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out[os.fsencode(e.name)] = st
        return out

    def _check_names(self, names: set[bytes]) -> bool:
        """Whether each modified name is still the tracked file of that name (else a full scan is due)."""
        assert self._dirfd is not None
        by_path = {f.path: f for f in self.pos.files.values()}
        for n in names:
            f = by_path.get(n)
            if f is None:
                if self.config.is_excluded(os.fsdecode(n)):
                    continue
                return False
            try:
                st = os.stat(n, dir_fd=self._dirfd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if _key(st) != (f.dev, f.ino):
                return False
        return True

    def _reconcile(
        self, listing: dict[bytes, os.stat_result], b: _Builder, out: list[SpooledSegment]
    ) -> None:
        """Match the directory to the tracked files: moves, new files, vanished files."""
        present = {_key(st): name for name, st in listing.items()}
        vanished = [f for k, f in self.pos.files.items() if k not in present]
        for f in vanished:  # what was written before it went: through the descriptor still held
            if f.fd is not None:
                self._read_new(f, None, b, out, may_stop=False)
        t = self._now()  # one time for the scan's structural events: a restore never splits them
        for f in vanished:
            b.add(Delete(t, f.gen))
            self._drop(f)
        for name, st in sorted(listing.items()):
            known = self.pos.files.get(_key(st))
            if known is None:
                gen = self._new_gen()
                mode = stat.S_IMODE(st.st_mode)
                b.add(Create(t, gen, name, mode))
                self.pos.files[_key(st)] = TrackedFile(st.st_dev, st.st_ino, gen, name, mode=mode)
            elif known.path != name:
                b.add(Move(t, known.gen, name))
                known.path = name

    def _new_gen(self) -> int:
        g = self.pos.gen_next
        self.pos.gen_next += 1
        return g

    def _drop(self, f: TrackedFile) -> None:
        if f.fd is not None:
            with contextlib.suppress(OSError):
                os.close(f.fd)
        del self.pos.files[(f.dev, f.ino)]

    def _fd(self, f: TrackedFile) -> int | None:
        """The tracked file's descriptor, opened by its path if needed; None if the path names another
        file now (the next full scan sorts it out)."""
        if f.fd is not None:
            return f.fd
        assert self._dirfd is not None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)
        try:
            try:
                fd = os.open(f.path, flags, dir_fd=self._dirfd)
            except PermissionError:
                fd = os.open(f.path, flags & ~getattr(os, "O_NOATIME", 0), dir_fd=self._dirfd)
        except OSError:
            self._listed = False
            return None
        if _key(os.fstat(fd)) != (f.dev, f.ino):
            os.close(fd)
            self._listed = False
            return None
        f.fd = fd
        return fd

    def _read_new(
        self,
        f: TrackedFile,
        st: os.stat_result | None,
        b: _Builder,
        out: list[SpooledSegment],
        may_stop: bool,
    ) -> bool:
        """Append what `f` gained since it was last read; False if it stopped at the cut's size limit."""
        if st is not None and st.st_size == f.offset and st.st_mtime_ns == f.mtime_ns:
            return True  # unchanged since the last read (the listing's stat saves opening it)
        fd = self._fd(f)
        if fd is None:
            return True
        st = os.fstat(fd)
        if st.st_size == f.offset and st.st_mtime_ns == f.mtime_ns:
            return True
        if self._rewritten(f, fd, st):
            t = self._now()
            b.add(Delete(t, f.gen))
            f.gen, f.offset, f.tail, f.chunks = self._new_gen(), 0, b"", []
            f.mode = stat.S_IMODE(st.st_mode)
            b.add(Create(t, f.gen, f.path, f.mode))
        size = st.st_size
        while f.offset < size:
            if b.room == 0:
                self._flush(b, out)
                if may_stop and len(out) >= SEGMENTS_PER_CUT:
                    return False  # enough for one cut: let the loop spool it and come back
            want = min(size - f.offset, b.room, _READ_CHUNK)
            data = os.pread(fd, want, f.offset)
            if not data:
                break  # shrank while read: the next cut sees the truncation
            b.add(Append(self._now(), f.gen, f.offset, data))
            f.offset += len(data)
            f.tail = (f.tail + data)[-TAIL:]
            f.used = self._cuts
        f.mtime_ns = st.st_mtime_ns
        return True

    @staticmethod
    def _rewritten(f: TrackedFile, fd: int, st: os.stat_result) -> bool:
        if st.st_size < f.offset:
            return True  # truncated
        if f.offset and f.tail:
            return os.pread(fd, len(f.tail), f.offset - len(f.tail)) != f.tail  # rewritten in place
        return False

    def _flush(self, b: _Builder, out: list[SpooledSegment], covers: int | None = None) -> None:
        """Seal and spool the builder's events, then save the position (in that order). `covers`: every
        change before it is in this segment or an earlier one (default: what earlier cuts covered)."""
        events = tuple(b.events)
        p = self.pos
        seg = Segment(
            self.source,
            p.stream,
            p.seq,
            p.last,
            p.digest,
            events[0].time_ns,
            events[-1].time_ns,
            events,
            p.base if p.seq == 0 else None,
        )
        plaintext = segments.encode_segment(seg)
        name = str(SegmentName.new(seg.first_ns, p.stream, p.seq))
        sealed = segments.seal_segment(self.repo.keys, name, plaintext, self._cctx)
        key = self.repo.layout.key(Handle(Kind.SEGMENT, name, self.tag))
        self.spool.put(key, sealed, self.repo.tenant, self.sites)
        p.seq += 1
        p.last = name
        p.digest = self.repo.content_id(plaintext)
        self._save()
        b.events.clear()
        b.data = 0
        done = SpooledSegment(
            self.source,
            key,
            name,
            p.stream,
            seg.seq,
            seg.first_ns,
            seg.last_ns,
            seg.data_bytes,
            len(sealed),
            time.time_ns(),
            self.caught_up_ns if covers is None else covers,
        )
        out.append(done)
        if self.on_segment is not None:
            self.on_segment(done)

    def _close_idle(self) -> None:
        open_files = [f for f in self.pos.files.values() if f.fd is not None]
        if len(open_files) <= MAX_OPEN:
            return
        open_files.sort(key=lambda f: f.used)
        for f in open_files[: len(open_files) - MAX_OPEN]:
            assert f.fd is not None
            os.close(f.fd)
            f.fd = None


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event | None, seconds: float) -> None:
    waits = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waits.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


__all__ = ["LogStreamer", "SpooledSegment"]
