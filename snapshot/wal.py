"""Spooling the WAL files that `drsvc wal-push` left in a postgres source's incoming directory.

1. List the incoming directory (``drsvc.core.pgwal``): WAL file names only, in name order; temporary
   files, markers and anything else are left alone.
2. For each file: read it, compress and seal it as a WAL object under its own name
   (``drsvc.core.walobject``), ``Spool.put`` it for the source's sites (fsync, then the outbox row). A
   name that has a marker already was spooled: same content, nothing to do; other content, the file is
   moved to ``.rejected`` and SnapshotError raised (archived WAL is never replaced).
3. Only after the put returned: write its ``.done`` marker (size, mtime, SHA-256: what wal-push compares a
   file pushed again with once the copy is gone), then remove the incoming file. A crash in between spools
   the same file again, under the same key and with the same bytes (sealing is deterministic).
4. ``sweep_markers`` removes markers older than a retention period (the caller schedules it).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from drsvc.core import pgwal
from drsvc.core.durable import write_file
from drsvc.core.errors import SnapshotError
from drsvc.core.layout import Handle, Kind, Layout
from drsvc.core.spool import Spool
from drsvc.core.walobject import WalSealer

REJECTED_DIR = ".rejected"
MARKER_KEEP = 14 * 86400.0  # seconds a .done marker is kept: wal-push's duplicate check reaches this far back


def pending_wal(incoming: Path) -> list[str]:
    """The WAL files waiting in an incoming directory, in name order."""
    try:
        names = os.listdir(incoming)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if pgwal.is_wal_name(n))


@dataclass
class WalIngest:
    """Moves one source's incoming WAL files into the spool. ``ingest`` is blocking and thread-safe."""

    sealer: WalSealer
    layout: Layout
    source: str
    source_tag: str
    spool: Spool
    sites: Sequence[str]
    incoming: Path

    def ingest(self, name: str) -> str | None:
        """Spool one incoming file; its store key, or None if it was gone (another ingest took it)."""
        path = self.incoming / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            data = _read_all(fd, st.st_size)
            sysid = 0
            if pgwal.is_segment(name) or name.endswith(".partial"):
                try:
                    sysid, _ = pgwal.read_long_header(fd)
                except ValueError:
                    pass  # wal-push checked it; a damaged header is PostgreSQL's to report at replay
        finally:
            os.close(fd)
        digest = hashlib.sha256(data).hexdigest()
        key = self.layout.key(Handle(Kind.WAL, name, self.source_tag))
        if not self._spooled_before(name, digest):
            sealed = self.sealer.seal(self.source, name, data, st.st_mtime_ns, sysid)
            self.spool.put(key, sealed, self.layout.tenant, self.sites)
        marker = pgwal.marker_text(st.st_size, st.st_mtime_ns, digest)
        # readable by wal-push, which may run as another user (PostgreSQL's); losing it costs one upload
        write_file(self.incoming / pgwal.DONE_DIR / name, marker.encode(), fsync=False, mode=0o644)
        path.unlink(missing_ok=True)
        return key

    def _spooled_before(self, name: str, digest: str) -> bool:
        """Whether a file of this name was spooled before: with the same content, True (nothing to do);
        with other content, it is moved to ``.rejected`` and SnapshotError raised: WAL once archived is
        never replaced (wal-push refuses such a file; this catches one that slipped past it)."""
        try:
            _, _, done = pgwal.parse_marker((self.incoming / pgwal.DONE_DIR / name).read_text())
        except (FileNotFoundError, ValueError):
            return False
        if done == digest:
            return True
        rejected = self.incoming / REJECTED_DIR
        rejected.mkdir(exist_ok=True)
        os.rename(self.incoming / name, rejected / f"{name}.{time.time_ns()}")
        raise SnapshotError(
            "an incoming WAL file has other content than the one archived under its name; moved aside",
            source=self.source,
            path=str(rejected),
            hint="two clusters, or a restored copy, archive into this source; give each its own source",
        )


def _read_all(fd: int, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise OSError(f"incoming WAL file shrank to {got} bytes while it was read")
        got += n
    return bytes(buf)


def sweep_markers(incoming: Path, keep: float = MARKER_KEEP, now: float | None = None) -> int:
    """Remove ``.done`` markers older than `keep` seconds; how many went."""
    limit = (time.time() if now is None else now) - keep
    removed = 0
    try:
        entries = list(os.scandir(incoming / pgwal.DONE_DIR))
    except FileNotFoundError:
        return 0
    for e in entries:
        try:
            if e.stat(follow_symlinks=False).st_mtime < limit:
                os.unlink(e.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed
