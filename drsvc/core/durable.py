"""Crash-safe file writes: an object is either absent or complete, and survives power loss once written."""

from __future__ import annotations

import os

# `typing` and `pathlib` are not imported at run time: `drsvc wal-push` (pgwal) imports this module on every
# call (mypy takes any name TYPE_CHECKING for true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path, fsync: bool = True) -> None:
    """mkdir -p, fsync'ing the parent of every directory it creates (or the new entry may be lost)."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        if fsync:
            fsync_dir(d.parent)


def write_file(path: Path, data: bytes | memoryview, fsync: bool = True, mode: int = 0o600) -> None:
    """Write to a temporary name in the same directory, fsync, rename into place, fsync the directory."""
    make_dirs(path.parent, fsync)
    tmp = path.parent / f"{TMP_PREFIX}{os.urandom(16).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
