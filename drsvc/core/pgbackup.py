"""What PostgreSQL writes about a base backup: its backup_label, and the backup history file it archives.

    backup_label (in the backup's root)          START WAL LOCATION: 0/2000028 (file 000000010000000000000002)
                                                 START TIMELINE: 1   ...
    <start segment>.<offset>.backup (archived)   the same, plus STOP WAL LOCATION, STOP TIME, ...

Both are ``KEY: value`` lines. A base backup's replay starts in the start segment and the cluster is
consistent once the stop LSN is replayed; the segment size follows from the start LSN and its file name.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from drsvc.core.pgwal import parse_lsn, seg_size_from

_LOCATION = re.compile(r"^([0-9A-F]+/[0-9A-F]+) \(file ([0-9A-F]{24})\)$")


@dataclass(frozen=True)
class BackupStart:
    """Where a base backup's WAL begins, from its backup_label."""

    lsn: int
    file: str  # the segment holding `lsn`: the first one replay needs
    timeline: int
    seg_size: int

    @property
    def history_file(self) -> str:
        """The name of the backup history file PostgreSQL archives when the backup stops."""
        return f"{self.file}.{self.lsn % self.seg_size:08X}.backup"


def parse_label(text: str) -> dict[str, str]:
    """The ``KEY: value`` lines of a backup_label or backup history file."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def wal_location(label: dict[str, str], key: str) -> tuple[int, str]:
    """(LSN, segment file name) of a ``START WAL LOCATION``-like line; ValueError if absent or malformed."""
    m = _LOCATION.match(label.get(key, ""))
    if m is None:
        raise ValueError(f"no valid {key!r} line")
    return parse_lsn(m.group(1)), m.group(2)


def parse_backup_label(text: str) -> BackupStart:
    """ValueError if `text` is not a usable backup_label."""
    label = parse_label(text)
    lsn, file = wal_location(label, "START WAL LOCATION")
    tli = int(label["START TIMELINE"]) if "START TIMELINE" in label else int(file[:8], 16)
    return BackupStart(lsn, file, tli, seg_size_from(lsn, tli, file))


def stop_segment(history: str) -> str:
    """The segment holding a backup's stop LSN, from its backup history file; ValueError if absent."""
    return wal_location(parse_label(history), "STOP WAL LOCATION")[1]


def default_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin holding pg_ctl (Debian's layout), or None."""
    found = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if os.path.exists(os.path.join(d, "pg_ctl"))]
    best = max(found, key=_major, default=None)
    return Path(best) if best is not None else None


def _major(bindir: str) -> tuple[int, ...]:
    version = os.path.basename(os.path.dirname(bindir))
    return tuple(int(p) for p in version.split(".") if p.isdigit())
