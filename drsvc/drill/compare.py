"""A drill's proof against the live source: is the restored data what the source held at the restored point?

Both sides are walked: the restored files must match the live ones that have not changed since, and every
live file that was already there, unchanged, at the restored point must be in the restore. Definitions (T is
the restored point: a tree's snapshot time, when its walk began; a log's last change-log event applied):

- **cut**: T minus ``CLOCK_SLACK_NS`` (1 s: file times come from the kernel's coarse clock, and some file
  systems keep whole seconds), and for a log source minus the tailer's longest delay to notice a file too
  (``log_delay_ns``: its rescan interval plus ``sync_interval``).
- A live file is **unchanged since T** when its mtime and its ctime are both at or before the cut and its
  directory is **anchored** (was that directory at T). On Linux a write, truncation, chmod, link or rename
  sets the inode's ctime, so such a file held these bytes under this name at T. The source's root is
  anchored; a subdirectory is anchored when its parent is and either the parent's ctime is at or before the
  cut (its names did not change since T) or its own is (it was not created or renamed in since T).
- Only what the snapshot would have read is expected: a tree walks like ``snapshot.tree`` (not following
  symlinks, skipping ``exclude`` matches, other file systems with ``one_file_system``, special files); a log
  source lists its directory's regular files, not excluded, like ``snapshot.logtail``.

1. Tree (``compare_tree``), one directory of both sides at a time, in name order:

   - a restored file with a live file of the same size and mtime: must be byte-identical (**compared**);
   - a restored file whose live file is unchanged since T (other size or mtime): must be byte-identical
     (**compared**; another size is a failure at once);
   - any other restored file with a live one: **changed since** (not comparable), as is one in a live
     directory that cannot be listed;
   - a restored file with no live regular file of that name: **gone since** (deleted or moved since T, which
     cannot be told from a file lost: counted, not a failure);
   - a live file unchanged since T with no restored file: **missing from the restore**, a failure;
   - any other live file with no restored file: **new since** T.

2. Log (``compare_log``): append-only, so a restored file must be a byte prefix of (or equal to) the live one
   of that name (**compared**); a shorter live file (truncated) or one whose bytes start another live file of
   its directory (rotated: renamed since) is **changed since**, a missing one **gone since**. A live file
   unchanged since T (cut as above) with no restored file is **missing from the restore**, a failure; any
   other live file with none is **new since**. (A restored log shorter than a live file unchanged since T is
   not a failure: after a burst the tailer may stamp older bytes later.)

``Comparison.compared`` is 0 when nothing could be compared: the caller reports the source as not verified
(None), not as equal. Files are read in ``CHUNK`` pieces; nothing here writes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from drsvc.core.config import SourceConfig
from snapshot.logtail import RESCAN_INTERVAL

CHUNK = 1 << 20
CLOCK_SLACK_NS = 1_000_000_000
LISTED = 20  # failures of one kind listed by name; the rest are counted in one line


@dataclass
class Comparison:
    identical: int = 0  # compared and byte-identical (for logs: a prefix of the live file)
    differing: int = 0  # compared and different: each one is a failure
    changed_since: int = 0  # restored files changed (or unreadable) at the source since T: not comparable
    missing: int = 0  # live files unchanged since T that the restore does not hold: each one is a failure
    gone_since: int = 0  # restored files the source no longer holds (deleted or moved since T)
    new_since: int = 0  # live files the restore does not hold that were not there, unchanged, at T
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _missing_names: list[str] = field(default_factory=list, repr=False)

    @property
    def compared(self) -> int:
        return self.identical + self.differing

    def counts(self) -> dict[str, int]:
        """The counts a drill report keeps (``source_compare``)."""
        return {
            "compared": self.compared,
            "identical": self.identical,
            "changed_since": self.changed_since,
            "missing_from_restore": self.missing,
            "gone_since": self.gone_since,
            "new_since": self.new_since,
        }

    def _differs(self, message: str) -> None:
        self.differing += 1
        if self.differing <= LISTED:
            self.failures.append(message)

    def _lacks(self, rel: str) -> None:
        self.missing += 1
        if self.missing <= LISTED:
            self._missing_names.append(rel)

    def _finish(self, what: str) -> Comparison:
        for rel in self._missing_names:
            self.failures.append(f"{rel}: {what}")
        if self.missing > LISTED:
            self.failures.append(f"and {self.missing - LISTED} more live files missing from the restore")
        if self.differing > LISTED:
            self.failures.append(f"and {self.differing - LISTED} more files that differ from the live source")
        return self


def log_delay_ns(source: SourceConfig) -> int:
    """How long a log source's tailer may take to notice a new file: a full rescan at least every
    RESCAN_INTERVAL (inotify can miss events, e.g. writes from another NFS client), then one cut."""
    return int((RESCAN_INTERVAL + source.sync_interval) * 1e9)


def _listing(path: str) -> dict[str, os.stat_result]:
    out = {}
    with os.scandir(path) as it:
        for e in it:
            try:
                out[e.name] = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
    return out


def _unchanged(st: os.stat_result, cut: int) -> bool:
    return st.st_mtime_ns <= cut and st.st_ctime_ns <= cut


def _is_prefix(restored: str | Path, live: str | Path) -> bool | None:
    """Whether the restored file's bytes are the first bytes of the live file (equal when as long); None when
    the live file cannot be opened (gone since it was listed, or unreadable)."""
    with open(restored, "rb") as a:
        try:
            b = open(live, "rb")
        except OSError:
            return None
        with b:
            return _starts(a, b)


def _starts(a: BinaryIO, b: BinaryIO) -> bool:
    while True:
        x = a.read(CHUNK)
        if not x:
            return True
        if b.read(len(x)) != x:
            return False


@dataclass(frozen=True)
class _Dir:
    rel: str  # "" for the root
    restored: bool  # the restore holds a directory here
    live: bool  # the live source holds a directory here (on the source's file system with one_file_system)
    walked: bool  # the snapshot would walk it: neither it nor a parent excluded or on another file system
    anchored: bool  # it was this directory at T (module docstring)
    stable: bool  # anchored, and its names did not change since T (ctime at or before the cut)


def compare_tree(restored: Path, source: SourceConfig, point_ns: int) -> Comparison:
    """The restored tree against the live source `source.path`, as of the snapshot time `point_ns` (module
    docstring, step 1)."""
    out = Comparison()
    cut = point_ns - CLOCK_SLACK_NS
    live_root = str(source.path)
    try:
        root: os.stat_result | None = os.stat(live_root)  # as the snapshot does: the root may be a symlink
    except OSError as exc:
        out.notes.append(f"the live source cannot be read: {exc.strerror}")
        root = None
    if root is not None and not stat.S_ISDIR(root.st_mode):
        out.notes.append("the live source is not a directory")
        root = None
    ok = root is not None
    stack = [_Dir("", True, ok, ok, ok, root is not None and root.st_ctime_ns <= cut)]
    while stack:
        d = stack.pop()
        here = _listing(os.path.join(restored, d.rel)) if d.restored else {}
        there: dict[str, os.stat_result] = {}
        readable = True
        if d.live:
            try:
                there = _listing(os.path.join(live_root, d.rel))
            except OSError as exc:
                readable = False
                out.notes.append(f"{d.rel or '.'}: the live directory cannot be listed: {exc.strerror}")
        subdirs: list[_Dir] = []
        for name in sorted(here.keys() | there.keys()):
            rel = f"{d.rel}/{name}" if d.rel else name
            r, lv = here.get(name), there.get(name)
            walked = d.walked and not (lv is not None and source.is_excluded(rel))
            r_dir = r is not None and stat.S_ISDIR(r.st_mode)
            if lv is not None and stat.S_ISDIR(lv.st_mode):
                assert root is not None
                same_fs = not source.one_file_system or lv.st_dev == root.st_dev
                anchored = d.anchored and (d.stable or lv.st_ctime_ns <= cut)
                stable = anchored and lv.st_ctime_ns <= cut
                if r_dir or (walked and same_fs):  # not into what neither the restore nor a snapshot holds
                    subdirs.append(_Dir(rel, r_dir, same_fs, walked and same_fs, anchored, stable))
            elif r_dir:
                subdirs.append(_Dir(rel, True, False, False, False, False))
            live_file = lv if lv is not None and stat.S_ISREG(lv.st_mode) else None
            # the live file held these bytes under this name at T, and the snapshot would have read it
            unchanged = live_file is not None and walked and d.anchored and _unchanged(live_file, cut)
            if r is not None and stat.S_ISREG(r.st_mode):
                if not readable:
                    out.changed_since += 1
                elif live_file is None:
                    out.gone_since += 1
                else:
                    _compare_file(out, restored, live_root, rel, r, live_file, unchanged)
            elif unchanged:
                out._lacks(rel)
            elif live_file is not None and walked:
                out.new_since += 1
        stack.extend(reversed(subdirs))  # depth first, in name order
    return out._finish("the live file has not changed since the restored point, but the restore lacks it")


def _compare_file(
    out: Comparison,
    restored: Path,
    live_root: str,
    rel: str,
    r: os.stat_result,
    lv: os.stat_result,
    unchanged: bool,
) -> None:
    same = lv.st_size == r.st_size and lv.st_mtime_ns == r.st_mtime_ns
    if not same and not unchanged:
        out.changed_since += 1
        return
    if not same and lv.st_size != r.st_size:
        out._differs(
            f"{rel}: the live file has not changed since the restored point, but the restored one has "
            f"{r.st_size} bytes and the live one {lv.st_size}"
        )
        return
    equal = _is_prefix(os.path.join(restored, rel), os.path.join(live_root, rel))
    if equal is None:
        out.changed_since += 1  # gone or unreadable since it was listed
    elif equal:
        out.identical += 1  # (with another mtime only where the restore went keeps coarser times)
    elif same:
        out._differs(
            f"{rel}: the restored file differs from the live source, which has the same size and mtime"
        )
    else:
        out._differs(
            f"{rel}: the restored file differs from the live source, which has not changed since the "
            "restored point"
        )


def compare_log(restored: Path, source: SourceConfig, point_ns: int) -> Comparison:
    """The restored log directory against the live one `source.path`, as of the last event applied,
    `point_ns` (module docstring, step 2)."""
    out = Comparison()
    cut = point_ns - CLOCK_SLACK_NS - log_delay_ns(source)
    live = Path(source.path)
    names: set[str] = set()
    for rel, st in _regular_files(restored):
        names.add(rel)
        ls = _live(live / rel)
        if ls is None:
            out.gone_since += 1
        elif ls.st_size < st.st_size:
            out.changed_since += 1  # truncated since
        elif (prefix := _is_prefix(restored / rel, live / rel)) is None:
            out.gone_since += 1  # gone, or unreadable, since it was listed
        elif prefix:
            out.identical += 1
        elif _rotated(restored / rel, st.st_size, (live / rel).parent):
            out.changed_since += 1  # renamed since, and a new file of that name started
        else:
            out._differs(f"{rel}: the restored log is not a prefix of the live file of that name")
    try:
        listing = _listing(str(live))
    except OSError as exc:
        out.notes.append(f"the live log directory cannot be listed: {exc.strerror}")
        listing = {}
    for name, st in sorted(listing.items()):
        if name in names or not stat.S_ISREG(st.st_mode) or source.is_excluded(name):
            continue
        if _unchanged(st, cut):
            out._lacks(name)
        else:
            out.new_since += 1
    return out._finish(
        "the live log was there, unchanged, before the restored point, but the restore lacks it"
    )


def _regular_files(root: Path) -> list[tuple[str, os.stat_result]]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out.append((os.path.relpath(p, root), st))
    return sorted(out)


def _live(path: Path) -> os.stat_result | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _rotated(restored: Path, size: int, live_dir: Path) -> bool:
    try:
        names = os.listdir(live_dir)
    except OSError:
        return False
    for name in names:
        ls = _live(live_dir / name)
        if ls is not None and ls.st_size >= size and _is_prefix(restored, live_dir / name):
            return True
    return False
