"""The local spool: sealed objects, fsync'd, waiting for their sites.

``Spool.put`` is the one way an object enters the system: the file is written to a temporary name, fsync'd,
renamed and its directory fsync'd; only then is its outbox row committed. Nothing is acknowledged to a source
before ``put`` returns. The file goes when every target site holds the object (``Spool.shipped``).
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from drsvc.core.durable import TMP_PREFIX, fsync_dir, make_dirs, write_file
from drsvc.core.errors import DRError, ObjectNotFound
from drsvc.core.outbox import Outbox


class StateBusy(DRError):
    hint = "wait for the other run to finish, or give this one its own [state] dir"


class Spool:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.dir = state_dir / "spool"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state_dir, 0o700)  # trees in the parent cache and the outbox name the source's files
        self._lock_fd: int | None = None
        self.outbox = Outbox(state_dir / "outbox.db")
        self._listeners: list[Callable[[], None]] = []

    def lock(self) -> None:
        """Take the state directory for this process (one daemon or CLI run at a time; workers excepted),
        then sweep what a crash left behind. The lock goes with the process."""
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateBusy(
                "another drsvc process is using this state directory", path=str(self.state_dir)
            ) from None
        self._lock_fd = fd
        self.sweep()

    def sweep(self) -> None:
        """Remove half-written temporary files, and the files and rows of objects every site acknowledged
        (a crash between the last acknowledgement and ``shipped``). Only the lock holder may sweep."""
        for key in self.outbox.forget_shipped():
            self.path(key).unlink(missing_ok=True)
        for tmp in self.dir.rglob(f"{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)

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
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


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
