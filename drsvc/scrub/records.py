"""The snapshot records. Every copy is read; a record belongs where the copy policy of its source
puts it (unless retention would forget it) and wherever it is. What each source's retention policy keeps
and forgets now is kept for the change logs (``changelog``)."""

from __future__ import annotations

import functools
import time
from collections import Counter

from drsvc.core import retention
from drsvc.core.format import SnapshotRecord
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import gather_limited
from drsvc.scrub.engine import SMALL_AT_ONCE, Scrub, ScrubObject
from drsvc.scrub.report import FindingKind, SnapshotRef
from drsvc.scrub.verify import decode_record


async def read_records(s: Scrub) -> dict[Handle, SnapshotRecord]:
    objs = s.of_kind(Kind.SNAPSHOT)
    records: dict[Handle, SnapshotRecord] = {}
    done = 0

    async def one(o: ScrubObject) -> None:
        nonlocal done
        got = await s.read(o, lambda b: decode_record(s.repo, o.handle, b), every_copy=True)
        if got is not None:
            records[o.handle] = got[0]
        done += 1
        s.tell("records", done, len(objs), o.label, o.read)

    await gather_limited(SMALL_AT_ONCE, [functools.partial(one, o) for o in objs])

    now = time.time_ns()
    for name in s.tags.values():
        retain = s.config.sources[name].retention
        if retain is not None:
            mine = [r for r in records.values() if r.source == name]
            s.plans[name] = retention.plan(mine, retain.policy(), now)
    # records retention would forget now: never spread them again
    forgotten = {r.id for plan in s.plans.values() for r in plan.forget}
    unknown: Counter[tuple[str, str]] = Counter()
    for o in objs:
        source = s.tags.get(o.handle.source_tag)
        if source is None:
            unknown.update((site, o.handle.source_tag) for site in o.sizes)
        where = set(o.sizes)
        if source is not None and o.handle.name not in forgotten:
            where |= set(s.config.sources[source].sites)
        s.expect(o, where)
        if o.good is None and o.sizes:
            lost = s.lost(o, "no copy of the snapshot record decodes")
            if lost is not None:
                lost.breaks.append(SnapshotRef(o.handle.name, source or f"(tag {o.handle.source_tag})", 0))
    for (site, tag), n in sorted(unknown.items()):
        s.find(
            site,
            FindingKind.EXTRA,
            f"snapshots/{tag}/",
            f"{n} snapshot records of a source tag that no configured source of the tenant has "
            "(a removed source?): kept where they are, not copied",
        )
    return records
