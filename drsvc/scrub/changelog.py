"""The change logs: the segments of log sources and the WAL objects of postgres sources.

1. Each belongs where the copy policy of the source whose tag it carries puts it, and wherever it is. One of
   a tag no configured source has stays where it is (extra: a removed source?), never spread.
2. A segment that retention has deleted stays where it is, unread and unrepaired (extra): its source has a
   retention policy, no checkpoint that policy keeps starts its stream, and it is older than the newest kept
   checkpoint (``App.forget`` deletes exactly these when it forgets a checkpoint). WAL has no retention yet:
   every WAL object is expected.
3. Read like packs (they run up to a source's segment_max, WAL files to 16 MiB and more): a share chosen by
   the rotation, plus every copy of one whose copies differ in size or that the last run left damaged, and
   a good copy of one a site lacks. A segment verifies when it opens, decodes, and is the stream, seq and
   time its name says of the source whose tag it carries; a WAL object when ``open_wal`` accepts it as that
   source's file of that name.
4. A missing or bad copy is rewritten from the copy that verified. One intact nowhere is unrecoverable, and
   the report says what it breaks: for a segment, the restores of its source to a time after its first
   event (until a newer stream starts); for a WAL file, point-in-time recovery past it.
"""

from __future__ import annotations

import datetime
import functools
from collections import Counter

from drsvc.core.format import SnapshotRecord
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import gather_limited
from drsvc.core.segments import SegmentName
from drsvc.scrub.engine import PACKS_AT_ONCE, Scrub, ScrubObject
from drsvc.scrub.report import FindingKind, Unrecoverable
from restore.logplan import Line, list_lines, stream_of

WHAT = {Kind.SEGMENT: "change-log segments", Kind.WAL: "WAL files"}


async def read_changelogs(s: Scrub, records: dict[Handle, SnapshotRecord]) -> None:
    """Set where each segment and WAL object belongs, verify a share of them, repair what a verified copy
    allows and name what the lost ones break. `records`: the snapshot records that decoded (checkpoints)."""
    deleted = retention_deleted(s)
    unknown: Counter[tuple[str, Kind, str]] = Counter()
    left: Counter[tuple[str, str]] = Counter()  # (site, source) -> segments retention deleted, still there
    todo: list[ScrubObject] = []
    for o in [*s.of_kind(Kind.SEGMENT), *s.of_kind(Kind.WAL)]:
        source = s.tags.get(o.handle.source_tag)
        where = set(o.sizes)
        if source is None:
            unknown.update((site, o.handle.kind, o.handle.source_tag) for site in o.sizes)
        elif o.handle in deleted:
            left.update((site, source) for site in o.sizes)
            s.expect(o, where)
            continue
        else:
            where |= set(s.config.sources[source].sites)
        s.expect(o, where)
        todo.append(o)

    lost: list[tuple[ScrubObject, Unrecoverable]] = []
    done = 0

    async def one(o: ScrubObject) -> None:
        nonlocal done
        if u := await _verify(s, o):
            lost.append((o, u))
        done += 1
        s.tell("changelogs", done, len(todo), o.label, o.read)

    await gather_limited(PACKS_AT_ONCE, [functools.partial(one, o) for o in todo])
    _name_breaks(s, lost, records)

    for (site, kind, tag), n in sorted(unknown.items(), key=lambda x: (x[0][0], x[0][1].value, x[0][2])):
        s.find(
            site,
            FindingKind.EXTRA,
            f"{kind.value}/{tag}/",
            f"{n} {WHAT[kind]} of a source tag that no configured source of the tenant has "
            "(a removed source?): kept where they are, not copied",
        )
    for (site, source), n in sorted(left.items()):
        s.find(
            site,
            FindingKind.EXTRA,
            f"{Kind.SEGMENT.value}/{s.repo.keys.source_tag(source)}/",
            f"{n} change-log segments of {source} that retention has deleted (no kept checkpoint starts "
            "their stream, and they are older than the newest one): not copied, not verified; forget "
            "deletes them",
        )


def retention_deleted(s: Scrub) -> set[Handle]:
    """The segments ``App.forget`` deletes, by the retention plans of the records: of each log source with
    a retention policy, those whose stream no kept checkpoint starts, older than the newest kept checkpoint
    (none while no checkpoint is kept)."""
    kept: dict[str, tuple[set[str], int]] = {}  # tag -> (streams of kept checkpoints, the newest's time)
    for source, plan in s.plans.items():
        if s.config.sources[source].type == "log":
            checkpoints = [r for r, _ in plan.keep if "log_stream" in r.stats]
            newest = max((r.time_ns for r in checkpoints), default=0)
            kept[s.repo.keys.source_tag(source)] = ({stream_of(r) for r in checkpoints}, newest)
    out: set[Handle] = set()
    for o in s.of_kind(Kind.SEGMENT):
        if o.handle.source_tag in kept:
            streams, newest = kept[o.handle.source_tag]
            name = SegmentName.parse(o.handle.name)  # a listed segment's name parses (inventory)
            if name.stream not in streams and name.first_ns < newest:
                out.add(o.handle)
    return out


async def _verify(s: Scrub, o: ScrubObject) -> Unrecoverable | None:
    every = s.every(o)
    if not (every or o.targets):
        return None
    got = await s.read(o, s.verifier(o), every)
    if got is not None:
        await s.repair_copies(o, got[1])
        return None
    if not o.sizes:  # every copy went since it was listed (forget deleted it meanwhile): nothing is lost
        return None
    what = "change-log segment" if o.handle.kind is Kind.SEGMENT else "WAL file"
    return s.lost(o, f"no copy of the {what} verifies")


def _name_breaks(
    s: Scrub, lost: list[tuple[ScrubObject, Unrecoverable]], records: dict[Handle, SnapshotRecord]
) -> None:
    segments = s.of_kind(Kind.SEGMENT)
    lines: dict[str, dict[str, Line]] = {}  # source tag -> its streams, from the listing and the checkpoints
    for o, u in sorted(lost, key=lambda x: x[0].handle):
        tag = o.handle.source_tag
        source = s.tags.get(tag, f"(tag {tag})")
        if o.handle.kind is Kind.WAL:
            u.detail += "; " + wal_breaks(source, o.handle.name)
            continue
        if tag not in lines:
            names = [SegmentName.parse(x.handle.name) for x in segments if x.handle.source_tag == tag]
            checkpoints = [r for h, r in records.items() if h.source_tag == tag and "log_stream" in r.stats]
            lines[tag] = list_lines(names, checkpoints)
        u.detail += "; " + segment_breaks(source, SegmentName.parse(o.handle.name), lines[tag])


def segment_breaks(source: str, name: SegmentName, lines: dict[str, Line]) -> str:
    """What losing segment `name` breaks: restores of `source` to a time after its first event, until the
    next stream (the next line, see ``restore.logplan.choose_line``) starts."""
    line = lines[name.stream]
    after = line.by_seq.get(name.seq + 1, [])
    ends = f"to before {iso(min(c.first_ns for c in after))}" if after else "to the end of its stream"
    what = f"segment {name.seq} of stream {name.stream}, its events from {iso(name.first_ns)} {ends}"
    newer = [ln.start_ns for ln in lines.values() if (ln.start_ns, ln.stream) > (line.start_ns, line.stream)]
    until = min(newer, default=None)
    if until is not None and until <= name.first_ns:
        return f"no restore of {source} reads it: a newer stream starts at {iso(until)} ({what})"
    text = f"restores of {source} after {iso(name.first_ns)} stop at this gap"
    if until is not None:
        text += f" (from {iso(until)} on, a newer stream serves them)"
    if len(line.by_seq.get(name.seq, ())) > 1:
        text += "; another segment has its seq (cut again after a crash): used if the next segment names it"
    return f"{text} ({what})"


def wal_breaks(source: str, name: str) -> str:
    """What losing WAL file `name` breaks."""
    if name.endswith(".backup"):
        return (
            f"restores of {source} from the base backup starting in {name[:24]} cannot read its stop "
            "position: only its first WAL segment is checked before recovery"
        )
    text = f"point-in-time recovery of {source} cannot pass {name}"
    if name.endswith(".history"):
        text += f": recovery cannot follow timeline {int(name[:8], 16)}"
    return text


def iso(time_ns: int) -> str:
    return datetime.datetime.fromtimestamp(time_ns / 1e9, datetime.UTC).isoformat(timespec="milliseconds")
