"""The local spool: sealed objects, fsync'd, waiting for their sites.

``Spool.put`` is the one way an object enters the system: the file is written to a temporary name, fsync'd,
renamed and its directory fsync'd; only then is its outbox row committed. Nothing is acknowledged to a source
before ``put`` returns. The file goes when every target site holds the object (``Spool.shipped``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from drsvc.core.durable import TMP_PREFIX, fsync_dir, make_dirs, write_file
from drsvc.core.errors import DRError, ObjectNotFound
from drsvc.core.outbox import Outbox


class SpoolFull(DRError):
    hint = "a site is down or slow: the spool holds the backlog; free space, raise the quota or fix the site"


class Spool:
    def __init__(self, state_dir: Path, quota: int = 0) -> None:
        self.state_dir = state_dir
        self.dir = state_dir / "spool"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(state_dir / "outbox.db")
        self.quota = quota
        self._listeners: list[Callable[[], None]] = []

    def path(self, key: str) -> Path:
        return self.dir / key

    def put(self, key: str, data: bytes, tenant: str, sites: Sequence[str], barrier: bool = False) -> int:
        """Durably spool an object for `sites` (blocking: call from a worker thread)."""
        path = self.path(key)
        if not path.exists():
            write_file(path, data)
        return self._committed(key, len(data), tenant, sites, barrier)

    def begin(self, key: str) -> SpoolWriter:
        """Start writing an object piece by piece (a pack); nothing is visible before ``commit``."""
        return SpoolWriter(self, key)

    def _committed(self, key: str, size: int, tenant: str, sites: Sequence[str], barrier: bool) -> int:
        seq = self.outbox.add(key, tenant, size, sites, barrier)
        self.notify()
        return seq

    def notify(self) -> None:
        """Tell the subscribers that objects were spooled (also those another process spooled)."""
        for listener in list(self._listeners):
            listener()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from the writing thread) after each put; returns the unsubscribe function."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def read(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(
                "spooled object is missing",
                key=key,
                site="spool",
                hint="the local spool was altered; run `drsvc check`",
            ) from None

    def shipped(self, seq: int, key: str) -> None:
        """Every target site holds the object: drop the file, then the row (a crash between is harmless)."""
        self.path(key).unlink(missing_ok=True)
        self.outbox.forget(seq)

    def used_bytes(self) -> int:
        return self.outbox.spooled_bytes()

    def close(self) -> None:
        self.outbox.close()


class SpoolWriter:
    """An object being written into the spool: a temporary file, fsync'd and renamed by ``commit``."""

    def __init__(self, spool: Spool, key: str) -> None:
        self.spool = spool
        self.key = key
        self.path = spool.path(key)
        make_dirs(self.path.parent)
        self.tmp = self.path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)

    def commit(self, tenant: str, sites: Sequence[str], barrier: bool = False) -> int:
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.spool._committed(self.key, self.size, tenant, sites, barrier)

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)
