"""A drill's proof against the live source: is the restored data what the source held?

1. List the restored regular files (``lstat``, no link followed), sorted.
2. Tree (``compare_tree``): a live file of the same name, size and mtime must be byte-identical; one changed
   or gone since the restored point is not comparable and counted as skipped.
3. Log (``compare_log``): append-only, so a restored file must be a byte prefix of (or equal to) the live one
   of that name; a shorter or missing live file (truncated, removed) is skipped, and so is one whose bytes
   start another live file of its directory (rotated: renamed since).

Files are read in ``CHUNK`` pieces; nothing here writes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 1 << 20


@dataclass
class Comparison:
    identical: int = 0  # restored files found byte-identical to (or, for logs, a prefix of) the live ones
    skipped: int = 0  # changed, truncated or gone at the source since the restored point: not comparable
    failures: list[str] = field(default_factory=list)


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


def _is_prefix(restored: Path, live: Path) -> bool:
    """Whether the restored file's bytes are the first bytes of the live file (equal when as long)."""
    with open(restored, "rb") as a, open(live, "rb") as b:
        while True:
            x = a.read(CHUNK)
            if not x:
                return True
            if b.read(len(x)) != x:
                return False


def compare_tree(restored: Path, live: Path) -> Comparison:
    """Every restored file that is unchanged at the live source (same size and mtime as restored) must be
    byte-identical to it; files changed or removed since are counted as skipped."""
    out = Comparison()
    for rel, st in _regular_files(restored):
        ls = _live(live / rel)
        if ls is None or ls.st_size != st.st_size or ls.st_mtime_ns != st.st_mtime_ns:
            out.skipped += 1
        elif _is_prefix(restored / rel, live / rel):
            out.identical += 1
        else:
            out.failures.append(
                f"{rel}: the restored file differs from the live source, which has the same size and mtime"
            )
    return out


def compare_log(restored: Path, live: Path) -> Comparison:
    """Append-only files: every restored file must be a byte prefix of (or equal to) the live file of the same
    name, or of another live file in its directory (rotated since: renamed). A live file shorter than the
    restored one was truncated since, and a missing one removed: both are counted as skipped."""
    out = Comparison()
    for rel, st in _regular_files(restored):
        ls = _live(live / rel)
        if ls is None or ls.st_size < st.st_size:
            out.skipped += 1
        elif _is_prefix(restored / rel, live / rel):
            out.identical += 1
        elif _rotated(restored / rel, st.st_size, (live / rel).parent):
            out.skipped += 1
        else:
            out.failures.append(f"{rel}: the restored log is not a prefix of the live file of that name")
    return out


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
