"""Waking the `log` tailer: inotify on the source directory (not its subdirectories).

Structural events (create, rename, delete, the directory itself moved or deleted, a queue overflow) call
for a full rescan; a modified file is read by name. Without inotify (not Linux, no instance left, the watch
limit ``fs.inotify.max_user_watches`` reached) the tailer polls, and says why.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

__all__ = ["Watch"]

try:  # inotify_simple is Linux-only; without it the tailer polls
    import inotify_simple
except ImportError:  # pragma: no cover - always installed on Linux
    inotify_simple = None

_IN_MODIFY, _IN_CLOSE_WRITE = 0x2, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_Q_OVERFLOW, _IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
_WATCH_MASK = (
    _IN_MODIFY
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
)
_STRUCTURAL = (
    _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_Q_OVERFLOW
    | _IN_IGNORED
)


class Watch:
    """One inotify instance watching one directory; its descriptor goes to ``loop.add_reader``."""

    def __init__(self, inotify: Any) -> None:
        self._ino = inotify

    @classmethod
    def open(cls, path: Path) -> tuple[Watch | None, str]:
        """A watch on `path`, or None and the reason it could not be made."""
        if inotify_simple is None:
            return None, "inotify is not available"
        try:
            ino = inotify_simple.INotify(nonblocking=True)
        except OSError as exc:
            return None, f"cannot start inotify ({exc.strerror})"
        try:
            ino.add_watch(str(path), _WATCH_MASK)
        except OSError as exc:
            ino.close()
            if exc.errno == errno.ENOSPC:
                return None, "the inotify watch limit is reached (fs.inotify.max_user_watches)"
            return None, f"cannot watch the directory ({exc.strerror})"
        return cls(ino), ""

    def fileno(self) -> int:
        fd: int = self._ino.fileno()
        return fd

    def read(self) -> tuple[set[bytes], bool]:
        """The names modified since the last read, and whether a full rescan is due (never blocks)."""
        try:
            events = self._ino.read(timeout=0)
        except OSError:
            return set(), True
        names: set[bytes] = set()
        structural = False
        for ev in events:
            if ev.mask & _STRUCTURAL:
                structural = True
            elif ev.name:
                names.add(os.fsencode(ev.name))
        return names, structural

    def close(self) -> None:
        self._ino.close()
