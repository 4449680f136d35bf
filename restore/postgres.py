"""Restoring a postgres source to a point in time: a base backup, plus the settings to replay WAL up to it.

1. Choose the newest base backup whose snapshot record is at or before T (the record is written after
   pg_basebackup returned, so the backup was consistent before T). Read its backup_label from the
   repository: start LSN, timeline, WAL segment size.
2. List the WAL archive at every site. Read the backup history file (``<start segment>.<offset>.backup``)
   for the backup's stop LSN; every segment from start to stop must be there, or the backup cannot be made
   consistent: RestoreError, nothing written. Then follow the contiguous segments after the stop: replay can
   go no further than the first missing one.
3. Find the end of the WAL: walk back from the last contiguous segment (at most SCAN_LIMIT segments, not
   below the backup's stop) to the newest one holding a commit or abort record (pg_waldump); its last time
   is reported. With T given: a time after T means replay meets it and stops at T
   (``recovery_target_time``); none after T (the last one is before T, or none since the backup, or the last
   segment was finished before T) means T is past the end: the target is left out and replay runs to the
   end (PostgreSQL refuses to start with a target it never reaches), which the result reports. When this
   cannot be told (pg_waldump missing, too many segments without transactions), T stays the target: a wrong
   "past the end" would replay commits after T, a wrong target only stops PostgreSQL with an error.
4. Restore the base backup's tree (``restore.restore_tree``: staging directory, verified blobs, rename).
5. Write ``recovery.signal`` and append the recovery settings to ``postgresql.auto.conf`` (the last setting
   of a name wins): restore_command, the target (and every other kind of target cleared), promote when
   reached, the end-of-recovery command that removes wal-fetch's prefetch directory, and ``archive_mode =
   off`` unless asked to keep archiving (a restored copy must not archive into the source it came from).
   New files get the data directory's owner; everything is fsync'd.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from drsvc.core import pgwal
from drsvc.core.errors import DRError, IntegrityError, RestoreError
from drsvc.core.format import SnapshotRecord
from drsvc.core.pgbackup import BackupStart, parse_backup_label, stop_segment
from drsvc.core.repository import Repository
from restore import RestoreResult, restore_tree
from restore.plan import choose_snapshot
from restore.wal import WalMissing, by_segment, fetch_wal, list_wal, xact_times
from restore.writer import Progress

PREFETCH_CLEANUP = f"rm -rf pg_wal/{pgwal.PREFETCH_DIR}"  # run by PostgreSQL in the data directory
SCAN_LIMIT = 32  # segments read back from the end of the archive before the target is kept as given


@dataclass
class WalPlan:
    """Where replay starts and ends, and the target it is given."""

    start: str  # the first segment replay needs (the base backup's start)
    stop: str  # the last segment the base backup needs to be consistent
    end: str  # the last segment of the contiguous archive after it
    gap: str | None  # the first missing segment, when later ones exist (replay cannot cross it)
    target_ns: int | None  # recovery_target_time; None: replay to the end of the WAL
    past_end: bool = False  # a time was requested, but the archive ends before it
    last_xact_ns: int | None = None  # past_end: the last commit or abort time, when known
    end_written_ns: int | None = None  # when PostgreSQL finished writing `end` (no record in it is later)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PostgresRestoreResult:
    base: RestoreResult  # the base backup's tree restore
    wal: WalPlan
    requested_ns: int | None
    restore_command: str

    @property
    def recovery_point_ns(self) -> int | None:
        """Where replay stops: the target; else, replaying the whole archive, the time PostgreSQL finished
        writing its last segment (every change up to then is in it, and none after its last transaction),
        or that last transaction's time when the segment's is unknown (None if neither is)."""
        if self.wal.target_ns is not None:
            return self.wal.target_ns
        return self.wal.end_written_ns if self.wal.end_written_ns is not None else self.wal.last_xact_ns

    @property
    def rpo_achieved_s(self) -> float | None:
        if self.requested_ns is None or self.recovery_point_ns is None:
            return None
        return max(0, self.requested_ns - self.recovery_point_ns) / 1e9


async def restore_postgres(
    repo: Repository,
    source: str,
    target: Path,
    at_ns: int | None,
    restore_command: str,
    *,
    pg_bindir: Path | None,
    keep_archiving: bool = False,
    progress: Callable[[Progress], None] | None = None,
) -> PostgresRestoreResult:
    """Lay down the base backup for `at_ns` (None: the latest) in `target` with the recovery settings;
    PostgreSQL started on `target` then replays the archive through `restore_command` (a `drsvc wal-fetch`
    command line ending in ``%f %p``). `pg_bindir` holds pg_waldump (None: the target is never dropped)."""
    record = choose_snapshot(await repo.snapshots(source), at_ns, source)
    start = await read_backup_start(repo, record)
    plan = await plan_wal(repo, source, start, at_ns, pg_bindir)

    def settings(staging: Path) -> None:  # written in the staging directory: in place with the rest, or not
        write_recovery_settings(staging, restore_command, plan.target_ns, keep_archiving, source)

    base = await restore_tree(repo, source, target, record.time_ns, progress, finish=settings)
    if base.snapshot.id != record.id:  # another record with the very same time: never in practice
        raise RestoreError("the base backup changed while it was restored", source=source, path=str(target))
    return PostgresRestoreResult(base, plan, at_ns, restore_command)


async def restorable_range(repo: Repository, source: str) -> tuple[int, int] | None:
    """(earliest, latest) points (ns) a postgres source can be recovered to: its oldest base backup's time
    to the time PostgreSQL finished writing the last segment of the contiguous archive after the newest
    complete base backup (every record up to then is archived). None without a base backup."""
    records = await repo.snapshots(source)
    for record in reversed(records):
        try:
            plan = await plan_wal(repo, source, await read_backup_start(repo, record), None, None)
        except RestoreError:
            continue  # its own WAL is incomplete: an older base backup may be whole
        try:
            end = (await fetch_wal(repo, source, plan.end)).time_ns
        except DRError:
            end = record.time_ns
        return records[0].time_ns, max(record.time_ns, end)
    return (records[0].time_ns, records[0].time_ns) if records else None


async def read_backup_start(repo: Repository, record: SnapshotRecord) -> BackupStart:
    """The backup_label of a base backup, read from its root tree (a few small ranged reads)."""
    for node in await repo.read_tree(record.tree):
        if node.name == b"backup_label":
            text = b"".join([await repo.read_blob(c) for c in node.content]).decode(errors="replace")
            break
    else:
        raise RestoreError(
            "the snapshot has no backup_label: not a base backup of a postgres source", snapshot=record.id
        )
    try:
        return parse_backup_label(text)
    except ValueError as exc:
        raise IntegrityError(f"unreadable backup_label: {exc}", snapshot=record.id) from None


async def plan_wal(
    repo: Repository, source: str, start: BackupStart, at_ns: int | None, pg_bindir: Path | None
) -> WalPlan:
    """Steps 2 and 3: check the WAL the base backup needs, find where replay ends, choose the target."""
    listing = await list_wal(repo, source)
    warnings = [
        f"site {s} could not be listed ({e}): its WAL is not counted" for s, e in listing.unreachable.items()
    ]
    seg = start.seg_size
    segments = by_segment(listing.names, seg, start.timeline)
    first = pgwal.parse_segment(start.file, seg)[1]
    stop = await _stop_segment(repo, source, start, warnings)
    lacking = [
        pgwal.segment_name(start.timeline, s, seg) for s in range(first, stop + 1) if s not in segments
    ]
    if lacking:
        raise RestoreError(
            f"the WAL the base backup needs is not in the archive: {', '.join(lacking[:5])}"
            + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""),
            source=source,
            hint="restore to an earlier time: an older base backup may be complete",
        )
    end = stop
    while end + 1 in segments:
        end += 1
    gap = pgwal.segment_name(start.timeline, end + 1, seg) if max(segments) > end else None
    if gap is not None:
        warnings.append(f"WAL segment {gap} is missing from the archive: replay cannot go past it")
    plan = WalPlan(start.file, segments[stop], segments[end], gap, at_ns, warnings=warnings)
    await _find_end(repo, source, segments, stop, end, at_ns, pg_bindir, plan)
    return plan


async def _stop_segment(repo: Repository, source: str, start: BackupStart, warnings: list[str]) -> int:
    """The segment of the backup's stop LSN, from its backup history file."""
    name = start.history_file
    try:
        history = (await fetch_wal(repo, source, name)).data.decode(errors="replace")
        return pgwal.parse_segment(stop_segment(history), start.seg_size)[1]
    except (WalMissing, ValueError) as exc:
        warnings.append(
            f"backup history file {name} unusable ({exc}): only the backup's first segment is checked"
        )
        return pgwal.parse_segment(start.file, start.seg_size)[1]


async def _find_end(
    repo: Repository,
    source: str,
    segments: dict[int, str],
    stop: int,
    end: int,
    at_ns: int | None,
    pg_bindir: Path | None,
    plan: WalPlan,
) -> None:
    """Step 3: the last transaction of the archive (for the report), and whether `at_ns` lies past it."""
    if pg_bindir is None:
        plan.warnings.append("pg_waldump not found: the end of the WAL is unknown, a target time is kept")
        return
    oldest = max(stop, end - SCAN_LIMIT + 1)
    written_before_t = False  # the scanned segments so far were all finished before T
    for segno in range(end, oldest - 1, -1):
        try:
            wal = await fetch_wal(repo, source, segments[segno])
            times = await xact_times(pg_bindir, wal)
        except (DRError, OSError) as exc:
            plan.warnings.append(f"cannot read {segments[segno]} ({exc}): the end of the WAL is unknown")
            return
        if segno == end:
            plan.end_written_ns = wal.time_ns
            written_before_t = at_ns is not None and wal.time_ns <= at_ns
        if times:
            plan.last_xact_ns = max(times)
            if at_ns is not None and plan.last_xact_ns <= at_ns:
                plan.target_ns, plan.past_end = None, True  # replay would never meet a transaction after T
            return
    if written_before_t or oldest == stop:  # no transaction after T in anything replay reads
        plan.target_ns, plan.past_end = None, at_ns is not None
    elif at_ns is not None:
        plan.warnings.append(f"no transaction in the last {SCAN_LIMIT} WAL segments: the target time is kept")


def _conf_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def recovery_time(ns: int) -> str:
    """A recovery_target_time value: UTC, microseconds (rounded down: a commit at or before T stays in)."""
    t = dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.UTC)
    return f"{t:%Y-%m-%d %H:%M:%S}.{ns // 1000 % 1_000_000:06d}+00"


def recovery_settings(restore_command: str, target_ns: int | None, keep_archiving: bool) -> dict[str, str]:
    settings = {
        "restore_command": _conf_str(restore_command),
        "recovery_end_command": _conf_str(PREFETCH_CLEANUP),
        # at most one kind of target may be set: clear those an earlier restore may have left
        "recovery_target": "''",
        "recovery_target_lsn": "''",
        "recovery_target_name": "''",
        "recovery_target_xid": "''",
        "recovery_target_time": _conf_str(recovery_time(target_ns)) if target_ns is not None else "''",
        "recovery_target_inclusive": "on",
        "recovery_target_action": "'promote'",
    }
    if not keep_archiving:
        settings["archive_mode"] = "off"
    return settings


def write_recovery_settings(
    datadir: Path, restore_command: str, target_ns: int | None, keep_archiving: bool, source: str
) -> None:
    """Append the recovery settings to postgresql.auto.conf and create recovery.signal, both owned like
    the data directory's PG_VERSION (the cluster's owner: in a staging directory the root is still ours)."""
    version = datadir / "PG_VERSION"
    st = os.stat(version if version.exists() else datadir)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    lines = [f"# drsvc restore of source {source} at {now}"]
    lines += [f"{k} = {v}" for k, v in recovery_settings(restore_command, target_ns, keep_archiving).items()]
    conf = datadir / "postgresql.auto.conf"
    _append(conf, ("\n".join(lines) + "\n").encode(), st)
    _append(datadir / "recovery.signal", b"", st)
    fd = os.open(datadir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, data: bytes, owner: os.stat_result) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_size and data:
            os.write(fd, b"\n")
        os.write(fd, data)
        os.fsync(fd)
        if os.geteuid() == 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)
    finally:
        os.close(fd)
