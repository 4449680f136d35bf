"""Watching a tree source with inotify, so that the daemon snapshots it seconds after it changes.

1. ``TreeWatcher.start()`` adds an inotify watch on every directory under the root (excluded ones and other
   file systems aside, like the snapshot itself), in a worker thread; new directories get theirs as they
   appear. Its file descriptor is read on the event loop (``add_reader``), a few bytes per event.
2. Every event that can change what a snapshot records (create, delete, modify, close after write, move,
   attribute change) calls ``on_change``; the supervisor debounces these into one incremental snapshot.
3. The events also name what changed: the directory each one happened in (its listing must be read again),
   and the directories created or moved in (nothing below them can come from the parent snapshot).
   ``take()`` hands them to the snapshot as it begins its walk (after reading what the kernel has queued,
   so every change finished before the walk is in it); the snapshot reads only those directories and
   reuses the parent's trees elsewhere. ``take()`` returns None (walk everything) for the first snapshot,
   after a queue overflow, after a watch that could not be added, after a new hard link (its other names
   change without an event in their directories), or when the root itself was moved or deleted;
   ``put_back()`` returns a failed snapshot's changes.
4. When inotify cannot cover the tree (the per-user watch limit, ``fs.inotify.max_user_watches``, or no
   inotify at all) the watcher says why in ``failed`` and stops; the supervisor then falls back to
   scanning on a short interval.

The periodic snapshots of ``interval`` remain: they are the full rescans that catch what events missed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from inotify_simple import INotify, flags

from snapshot.tree import Changes

log = logging.getLogger("drsvc.watch")

MASK = (
    flags.CREATE
    | flags.DELETE
    | flags.MODIFY
    | flags.CLOSE_WRITE
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.ATTRIB
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
    | flags.DONT_FOLLOW
)


class WatchLimit(Exception):
    """inotify cannot watch every directory of the tree."""


class TreeWatcher:
    def __init__(
        self,
        root: Path,
        on_change: Callable[[], None],
        excluded: Callable[[str], bool] = lambda _: False,
        one_file_system: bool = True,
    ) -> None:
        self.root = root
        self.on_change = on_change
        self.excluded = excluded
        self.one_file_system = one_file_system
        self.failed: str | None = None
        self.watches = 0
        self._inotify: INotify | None = None
        self._paths: dict[int, str] = {}  # watch descriptor -> directory, relative to the root ("" = root)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirs: set[str] = set()  # directories whose listing changed since the last take()
        self._deep: set[str] = set()  # directories created or moved in since then: read all below them
        self._full = True  # the next snapshot walks everything (the first one, after an overflow, ...)
        self._unwatched = False  # a directory could not be watched: every snapshot walks everything

    async def start(self) -> bool:
        """Watch the whole tree; False (and ``failed`` says why) if inotify cannot."""
        self._loop = asyncio.get_running_loop()
        try:
            self._inotify = INotify(nonblocking=True)
        except OSError as exc:
            return self._fail(f"inotify is not available: {exc.strerror}")
        try:
            await asyncio.to_thread(self._add_tree, "")
        except WatchLimit as exc:
            return self._fail(str(exc))
        self._loop.add_reader(self._inotify.fileno(), self._read)
        return True

    def take(self) -> Changes | None:
        """The changes since the last take (None: walk the whole tree), read up to now: call it as the walk
        begins, so that every change finished before is in them."""
        self._read(notify=False)
        full = self._full or self._unwatched or self._inotify is None
        changes = None if full else Changes(frozenset(self._dirs), frozenset(self._deep))
        self._dirs, self._deep, self._full = set(), set(), False
        return changes

    def put_back(self, changes: Changes | None) -> None:
        """A snapshot that took `changes` failed: the next one must cover them."""
        if changes is None:
            self._full = True
        else:
            self._dirs |= changes.dirs
            self._deep |= changes.deep

    def close(self) -> None:
        if self._inotify is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None

    def _fail(self, why: str) -> bool:
        self.failed = why
        log.warning(
            "cannot watch the tree; falling back to scanning", extra={"root": str(self.root), "why": why}
        )
        self.close()
        return False

    def _add_tree(self, rel: str) -> None:
        """Watch `rel` and every directory below it (blocking: runs in a thread)."""
        assert self._inotify is not None
        top = self.root / rel if rel else self.root
        try:
            dev = self.root.stat().st_dev
        except OSError:
            return
        stack = [(top, rel)]
        while stack:
            path, r = stack.pop()
            try:
                wd = self._inotify.add_watch(path, MASK)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise WatchLimit(
                        f"the inotify watch limit was reached after {self.watches} directories "
                        f"(fs.inotify.max_user_watches = {_max_watches()}): raise it with sysctl, or the "
                        "tree is scanned on a short interval instead"
                    ) from None
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # unreadable: changes there go unseen
                    self._unwatchable(r, exc)
                continue  # gone meanwhile: its parent's event says so
            self._paths[wd] = r
            self.watches += 1
            try:
                entries = list(os.scandir(path))
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    self._unwatchable(r, exc)
                continue
            for e in entries:
                child = f"{r}/{e.name}" if r else e.name
                try:
                    if not e.is_dir(follow_symlinks=False) or self.excluded(child):
                        continue
                    if self.one_file_system and e.stat(follow_symlinks=False).st_dev != dev:
                        continue
                except OSError:
                    continue
                stack.append((Path(e.path), child))

    def _unwatchable(self, rel: str, exc: OSError) -> None:
        if not self._unwatched:
            log.warning(
                "a directory cannot be watched; every watched snapshot walks the whole tree",
                extra={"root": str(self.root), "dir": rel or ".", "why": exc.strerror},
            )
        self._unwatched = True

    def _read(self, notify: bool = True) -> None:
        if self._inotify is None:
            return
        try:
            events = self._inotify.read(timeout=0)
        except BlockingIOError:
            return
        changed = False
        for ev in events:
            if ev.mask & flags.Q_OVERFLOW:  # events were lost: the next snapshot walks everything
                self._full = changed = True
                continue
            if ev.mask & flags.IGNORED:
                self._paths.pop(ev.wd, None)
                continue
            parent = self._paths.get(ev.wd)
            if parent is None:
                continue
            changed = True
            if not ev.name:  # the watched directory itself: its node is in its parent's listing
                if not parent:
                    if ev.mask & (flags.DELETE_SELF | flags.MOVE_SELF):
                        self._full = True  # the root went away or moved: nothing is certain
                    self._dirs.add("")
                else:
                    self._dirs.update((parent, parent.rpartition("/")[0]))
                continue
            rel = f"{parent}/{ev.name}" if parent else ev.name
            if self.excluded(rel):
                continue
            self._dirs.add(parent)
            if ev.mask & (flags.CREATE | flags.MOVED_TO) and not ev.mask & flags.ISDIR:
                if _linked(self.root / rel):  # a hard link: its other names change with no event of theirs
                    self._full = True
            elif ev.mask & flags.ISDIR and ev.mask & (flags.CREATE | flags.MOVED_TO):
                self._deep.add(rel)  # new here: nothing below it comes from the parent snapshot
                try:
                    self._add_tree(rel)  # a few syscalls per new directory; on the loop, like the read
                except WatchLimit as exc:
                    self._fail(str(exc))
                    self.on_change()
                    return
        if changed and notify:
            self.on_change()


def _linked(path: Path) -> bool:
    """Whether a new name is a regular file with other names (gone already: no)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink > 1


def _max_watches() -> str:
    try:
        return Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip()
    except OSError:
        return "?"
