"""Retention: which snapshot records a policy keeps and which it forgets (restic's rules).

``plan(records, policy, now_ns)`` is pure: records in, a plan out. It never reads a site and never deletes.

1. Order the records newest first by (time, id); ties in time are broken by id, so the plan is deterministic.
2. An empty policy keeps everything (as restic does; the config refuses an empty policy anyway).
3. ``keep_last N``: keep the N newest records (partial or not).
4. ``keep_hourly/daily/weekly/monthly/yearly N``: walking newest first, a record whose bucket (local hour,
   day, ISO week, month, year) differs from the last bucket that rule kept is the newest of a new bucket: keep
   it, until N buckets are kept. Buckets with no snapshot do not count; the N most recent that have one do.
   **Partial snapshots never count toward these rules**: a partial snapshot is skipped (it neither fills a
   bucket nor uses one up), so the bucket is filled by its newest complete snapshot. A partial snapshot is a
   best effort (files changed or were unreadable while they were read); a long-lived daily/monthly/yearly
   recovery point must be a complete image.
5. ``keep_within D`` (seconds): keep every record with ``now - time <= D`` (restic measures from the newest
   snapshot instead; here it is measured from `now`).
6. The newest record is always kept.
7. ``keep_min M``: if fewer than M records are kept, also keep the newest not yet kept until M are (or all).

Every kept record carries its reasons: ``"last 3"`` (kept by keep_last = 3), ``"daily 2026-11-24"`` (the
bucket it is the newest of), ``"within 7d"``, ``"min 2"``, ``"newest"`` (kept by no rule but the newest). Both
lists of the plan are in ascending (time, id) order, like ``drsvc ls``.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from drsvc.core.format import SnapshotRecord

NS = 1_000_000_000


@dataclass(frozen=True)
class Policy:
    """What to keep; zero (or None) disables a rule. Plain values: the config model converts into it."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: float | None = None  # seconds
    keep_min: int = 0

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.keep_min < 0:
            raise ValueError("keep_min must not be negative")
        if self.keep_within is not None and self.keep_within < 0:
            raise ValueError("keep_within must not be negative")

    @property
    def empty(self) -> bool:
        return not (
            self.keep_last
            or self.keep_hourly
            or self.keep_daily
            or self.keep_weekly
            or self.keep_monthly
            or self.keep_yearly
            or self.keep_within
            or self.keep_min
        )


@dataclass(frozen=True)
class RetentionPlan:
    keep: list[tuple[SnapshotRecord, tuple[str, ...]]] = field(default_factory=list)
    forget: list[SnapshotRecord] = field(default_factory=list)


def _hour(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:00")


def _day(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%d")


def _week(t: datetime.datetime) -> str:
    year, week, _ = t.isocalendar()
    return f"{year}-W{week:02d}"


def _month(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m")


def _year(t: datetime.datetime) -> str:
    return t.strftime("%Y")


# (reason word, policy field, bucket label of a local time)
BUCKETS: tuple[tuple[str, str, Callable[[datetime.datetime], str]], ...] = (
    ("hourly", "keep_hourly", _hour),
    ("daily", "keep_daily", _day),
    ("weekly", "keep_weekly", _week),
    ("monthly", "keep_monthly", _month),
    ("yearly", "keep_yearly", _year),
)


def local_time(time_ns: int, tz: datetime.tzinfo | None = None) -> datetime.datetime:
    """The wall-clock time of a snapshot in `tz` (None: the host's local time zone), to the second."""
    utc = datetime.datetime.fromtimestamp(time_ns // NS, datetime.UTC)
    return utc.astimezone(tz)


def duration_text(seconds: float) -> str:
    """6h, 7d, 90m, 45s: the largest unit that divides the duration, for reasons and tables."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def plan(
    records: Sequence[SnapshotRecord], policy: Policy, now_ns: int, tz: datetime.tzinfo | None = None
) -> RetentionPlan:
    """Split `records` into kept (with reasons) and forgotten, by `policy` at time `now_ns`.

    Buckets are computed in `tz`, by default the host's local time zone. See the module docstring.
    """
    newest_first = sorted(records, key=lambda r: (r.time_ns, r.id), reverse=True)
    reasons: list[list[str]] = [[] for _ in newest_first]
    if policy.empty:
        for r in reasons:
            r.append("policy is empty")
    else:
        for i, _ in enumerate(newest_first[: policy.keep_last]):
            reasons[i].append(f"last {policy.keep_last}")
        for word, attr, label in BUCKETS:
            remaining: int = getattr(policy, attr)
            last_bucket: str | None = None
            for i, rec in enumerate(newest_first):
                if remaining <= 0:
                    break
                if rec.partial:
                    continue
                bucket = label(local_time(rec.time_ns, tz))
                if bucket != last_bucket:
                    reasons[i].append(f"{word} {bucket}")
                    last_bucket = bucket
                    remaining -= 1
        if policy.keep_within is not None and policy.keep_within > 0:
            horizon = now_ns - int(policy.keep_within * NS)
            text = f"within {duration_text(policy.keep_within)}"
            for i, rec in enumerate(newest_first):
                if rec.time_ns >= horizon:
                    reasons[i].append(text)
        if newest_first and not reasons[0]:
            reasons[0].append("newest")
        kept = sum(1 for r in reasons if r)
        for i in range(len(newest_first)):
            if kept >= policy.keep_min:
                break
            if not reasons[i]:
                reasons[i].append(f"min {policy.keep_min}")
                kept += 1
    out = RetentionPlan()
    for rec, why in reversed(list(zip(newest_first, reasons, strict=True))):
        if why:
            out.keep.append((rec, tuple(why)))
        else:
            out.forget.append(rec)
    return out


@dataclass
class ForgetOutcome:
    """What ``App.forget`` did (or, with dry_run, would do) to one source's snapshot records."""

    source: str
    plan: RetentionPlan
    sites: tuple[str, ...]  # the source's copy policy
    holders: dict[str, set[str]]  # snapshot id -> reachable sites that held its record
    deleted: dict[str, set[str]]  # snapshot id -> sites where its record was deleted
    unreachable: dict[str, str]  # site -> why it could not be listed or a deletion failed there
    dry_run: bool
    locked: dict[str, dict[str, str]] = field(default_factory=dict)  # id -> site -> retained until (lock)
    segments_forgotten: int = 0  # log sources: change-log segments of forgotten checkpoints (per site copy)
    wal_forgotten: int = 0  # postgres sources: archived WAL before the oldest kept base backup (per copy)
    segments_locked: int = 0  # of the segments and WAL, copies object lock keeps for now

    @property
    def complete(self) -> bool:
        """Every site of the source was reached (and, unless dry_run, every deletion done; a record kept by
        object lock counts as done: it goes by itself when a later run finds its retention over)."""
        return not self.unreachable
