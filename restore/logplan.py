"""Planning a `log` restore from listings: which stream, from which checkpoint, and the restorable range.

1. Segments are listed at every site (the union); their names give time, stream and sequence number.
2. Checkpoints are the source's snapshot records whose stats carry ``log_stream``: the stream that starts
   from them. Records are read from whichever site holds them intact.
3. A line is one stream: it starts at its checkpoint's time if it has one, else at its first segment. A
   restore at T uses the newest line that had started by T (a checkpoint whose stream has no segment yet is
   a line of its own: the directory at the checkpoint's time).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from drsvc.core import segments
from drsvc.core.errors import DRError, IntegrityError, StoreError
from drsvc.core.format import SnapshotRecord
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import Repository, gather_limited
from drsvc.core.segments import Segment, SegmentName

__all__ = [
    "Line",
    "LogRange",
    "choose_line",
    "fetch_record",
    "fetch_segment",
    "list_checkpoints",
    "list_lines",
    "list_segments",
    "restorable_range",
    "stream_of",
]


@dataclass
class Line:
    """One stream of a source: its segments by sequence number and the checkpoint it starts from."""

    stream: str
    by_seq: dict[int, list[SegmentName]] = field(default_factory=dict)  # candidates sorted, oldest first
    checkpoint: SnapshotRecord | None = None

    @property
    def start_ns(self) -> int:
        if self.checkpoint is not None:
            return self.checkpoint.time_ns
        return min(c.first_ns for cands in self.by_seq.values() for c in cands)

    @property
    def segments(self) -> int:
        return sum(map(len, self.by_seq.values()))


@dataclass(frozen=True)
class LogRange:
    """What a log source can be restored to: from the oldest line's start to the newest line's last event."""

    earliest_ns: int
    latest_ns: int
    stream: str  # the newest line's stream
    segments: int  # segments listed, all lines
    checkpoints: int
    streams: int


async def list_segments(repo: Repository, source: str) -> tuple[list[SegmentName], list[str]]:
    """Every segment of `source` listed at any site (by name), and warnings for sites that could not be
    listed or objects that are not segment names."""
    tag = repo.keys.source_tag(source)
    names: set[str] = set()
    warnings: list[str] = []
    for store in repo.stores:
        try:
            for h in await repo.list_handles(Kind.SEGMENT, tag, store=store):
                names.add(h.name)
        except StoreError as exc:
            warnings.append(f"{store.name}: cannot list segments: {exc.message}")
    parsed = []
    for n in sorted(names):
        try:
            parsed.append(SegmentName.parse(n))
        except IntegrityError:
            warnings.append(f"stray object under the source's logs: {n}")
    return parsed, warnings


async def fetch_record(repo: Repository, source: str, record_id: str) -> SnapshotRecord:
    tag = repo.keys.source_tag(source)
    return await repo.fetch(
        Handle(Kind.SNAPSHOT, record_id, tag), lambda b: repo.decode_snapshot(record_id, b, source)
    )


async def list_checkpoints(repo: Repository, source: str) -> tuple[list[SnapshotRecord], list[str]]:
    """The source's checkpoint records found at any site, oldest first, and warnings."""
    tag = repo.keys.source_tag(source)
    ids: set[str] = set()
    warnings: list[str] = []
    for store in repo.stores:
        try:
            ids.update(h.name for h in await repo.list_handles(Kind.SNAPSHOT, tag, store=store))
        except StoreError as exc:
            warnings.append(f"{store.name}: cannot list checkpoints: {exc.message}")

    async def one(record_id: str) -> SnapshotRecord | None:
        try:
            return await fetch_record(repo, source, record_id)
        except DRError as exc:
            warnings.append(f"checkpoint {record_id} unreadable at every site: {exc.message}")
            return None

    found = await gather_limited(16, [functools.partial(one, i) for i in sorted(ids)])
    records = [r for r in found if r is not None and "log_stream" in r.stats]
    return sorted(records, key=lambda r: (r.time_ns, r.id)), warnings


def stream_of(record: SnapshotRecord) -> str:
    return f"{record.stats['log_stream'] % 2**64:016x}"


def list_lines(names: list[SegmentName], checkpoints: list[SnapshotRecord]) -> dict[str, Line]:
    lines: dict[str, Line] = {}
    for n in names:
        lines.setdefault(n.stream, Line(n.stream)).by_seq.setdefault(n.seq, []).append(n)
    for line in lines.values():
        for cands in line.by_seq.values():
            cands.sort()
    for rec in checkpoints:
        line = lines.setdefault(stream_of(rec), Line(stream_of(rec)))
        if line.checkpoint is None or (rec.time_ns, rec.id) > (line.checkpoint.time_ns, line.checkpoint.id):
            line.checkpoint = rec
    return lines


def choose_line(lines: dict[str, Line], at_ns: int | None) -> Line | None:
    """The newest line that had started by `at_ns` (None: the newest)."""
    begun = [ln for ln in lines.values() if at_ns is None or ln.start_ns <= at_ns]
    return max(begun, key=lambda ln: (ln.start_ns, ln.stream)) if begun else None


async def fetch_segment(repo: Repository, source: str, name: str) -> tuple[bytes, Segment]:
    """A segment, verified (AEAD with its name, codec, fields, name and source), and the keyed content id of
    its plaintext (the next segment's ``prev_digest``). Another site is tried on a missing or bad copy."""
    tag = repo.keys.source_tag(source)

    def decode(sealed: bytes) -> tuple[bytes, Segment]:
        plain = segments.open_segment(repo.keys, name, sealed)
        seg = segments.decode_segment(plain, name)
        segments.check_named(seg, name, source)
        return repo.content_id(plain), seg

    return await repo.fetch(Handle(Kind.SEGMENT, name, tag), decode)


async def restorable_range(repo: Repository, source: str) -> LogRange | None:
    """From the oldest line's start (a checkpoint's time, or a stream's first event) to the newest line's
    last event (its newest segment is read) or checkpoint. None if the source has neither."""
    names, _ = await list_segments(repo, source)
    checkpoints, _ = await list_checkpoints(repo, source)
    lines = list_lines(names, checkpoints)
    newest = choose_line(lines, None)
    if newest is None:
        return None
    latest = newest.start_ns
    if newest.by_seq:
        head = max(newest.by_seq[max(newest.by_seq)])
        _digest, seg = await fetch_segment(repo, source, str(head))
        latest = max(latest, seg.last_ns)
    return LogRange(
        earliest_ns=min(ln.start_ns for ln in lines.values()),
        latest_ns=latest,
        stream=newest.stream,
        segments=len(names),
        checkpoints=len(checkpoints),
        streams=len(lines),
    )
