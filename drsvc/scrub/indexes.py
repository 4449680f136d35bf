"""The indexes, a share of them read in full. What they hold says which packs belong where."""

from __future__ import annotations

import functools

from drsvc.core.format import PackIndex, SnapshotRecord
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import gather_limited
from drsvc.scrub.engine import SMALL_AT_ONCE, IndexedPack, Scrub, ScrubObject
from drsvc.scrub.report import snapshot_ref


async def read_indexes(s: Scrub, records: dict[Handle, SnapshotRecord]) -> dict[str, IndexedPack]:
    """Read the indexes present anywhere. An index belongs where it is, where a record that lists it
    belongs, and where a pack it names is; one that names a pack a prune condemned is being replaced
    by that prune: it is neither spread nor rewritten. An index listed by records but present nowhere
    is no finding either (prune replaces indexes; `drsvc check` finds blobs that no index names)."""
    named_by: dict[str, list[Handle]] = {}
    for h, rec in records.items():
        for name in rec.index:
            named_by.setdefault(name, []).append(h)
    objs = s.of_kind(Kind.INDEX)
    contents: dict[str, list[PackIndex]] = {}
    done = 0

    async def one(o: ScrubObject) -> None:
        nonlocal done
        every = s.every(o)
        got = await s.read(o, lambda b: s.repo.decode_index(o.handle.name, b), every)
        done += 1
        s.tell("indexes", done, len(objs), o.label, o.read)
        if got is not None:
            contents[o.handle.name] = got[0]
        elif lost := s.lost(
            o, "no copy of the index decodes; its packs can be indexed again from their sealed headers"
        ):
            lost.breaks.extend(snapshot_ref(records[rh]) for rh in named_by.get(o.handle.name, ()))

    await gather_limited(SMALL_AT_ONCE, [functools.partial(one, o) for o in objs])

    pack_sites: dict[str, set[str]] = {}
    for o in s.objects.values():
        if o.handle.kind is Kind.PACK:
            pack_sites[o.handle.name] = set(o.sizes)
    packs: dict[str, IndexedPack] = {}
    for o in objs:
        content = contents.get(o.handle.name)
        if content is None:
            continue
        where = set(o.sizes)
        if any(p.pack in s.condemned for p in content):
            o.frozen = "it names packs that a prune condemned: the prune replaces it"
        else:
            for rh in named_by.get(o.handle.name, ()):
                where |= s.objects[rh].expected
            for p in content:
                where |= pack_sites.get(p.pack, set())
        s.expect(o, where)
        for p in content:
            pk = packs.setdefault(p.pack, IndexedPack(p.salt))
            pk.expected |= o.expected
            for e in p.blobs:
                pk.entries.setdefault(e.blob_id, e)
    s.pack_entries = packs
    return packs
