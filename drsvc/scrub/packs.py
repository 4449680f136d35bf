"""The packs, a share of them read in full and verified against their sealed header and the
indexes; repaired as soon as a copy verifies. Of a pack no copy of which verifies: the blobs intact in
some copy."""

from __future__ import annotations

import asyncio
import functools

from drsvc.check import verify_pack
from drsvc.core.errors import DRError
from drsvc.core.format import BlobEntry
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import BlobLocation, Repository, gather_limited
from drsvc.scrub.engine import PACKS_AT_ONCE, IndexedPack, Scrub, ScrubObject, label
from drsvc.scrub.report import FindingKind


async def read_packs(s: Scrub, packs: dict[str, IndexedPack]) -> None:
    for name in packs:
        h = Handle(Kind.PACK, name)
        if h not in s.objects:
            s.objects[h] = ScrubObject(h, s.layout.key(h), label(s.layout, h))
    objs = s.of_kind(Kind.PACK)
    done = 0

    async def one(o: ScrubObject) -> None:
        nonlocal done
        pk = packs.get(o.handle.name)
        if o.handle.name in s.condemned:
            pass  # a prune deletes it after its grace period (or takes it back): nothing to keep
        elif pk is None:
            _extra(s, o, "in no index: on its way (its index not yet shipped) or garbage for prune")
        else:
            await _pack(s, o, pk)
        done += 1
        s.tell("packs", done, len(objs), o.label, o.read)

    await gather_limited(PACKS_AT_ONCE, [functools.partial(one, o) for o in objs])


def _extra(s: Scrub, o: ScrubObject, detail: str) -> None:
    for site in o.sizes:
        if (o.key, site) in s.in_flight:
            s.report.in_flight += 1
        else:
            s.find(site, FindingKind.EXTRA, o.label, detail)


async def _pack(s: Scrub, o: ScrubObject, pk: IndexedPack) -> None:
    for site in set(o.sizes) - pk.expected:
        s.find(site, FindingKind.EXTRA, o.label, "no index at this site names it")
    s.expect(o, pk.expected)
    every = s.every(o)
    if not (every or o.targets) or not (o.sizes or o.targets):
        return
    entries = list(pk.entries.values())
    name = o.handle.name

    async def on_bad(data: bytes) -> None:
        o.intact |= await asyncio.to_thread(_intact_blobs, s.repo, name, pk.salt, data, entries)

    got = await s.read(o, lambda b: verify_pack(s.repo, name, b, entries), every, on_bad)
    if got is None:
        lost = len(entries) - len(o.intact & pk.entries.keys())
        s.lost(
            o,
            ("no copy of the pack verifies" if o.sizes else "the pack is missing at every site")
            + f"; {lost} of its {len(entries)} blobs are intact at no site",
        )
        return
    await s.repair_copies(o, got[1])


def _intact_blobs(
    repo: Repository, pack: str, salt: bytes, data: bytes, entries: list[BlobEntry]
) -> set[bytes]:
    """The blobs of a damaged pack copy that still verify, located by the index (not the pack's header)."""
    out: set[bytes] = set()
    mv = memoryview(data)
    for e in entries:
        if e.offset + e.length > len(data):
            continue
        try:
            repo.open_blob(BlobLocation(pack, salt, e), mv[e.offset : e.offset + e.length], e.blob_id)
        except DRError:
            continue
        out.add(e.blob_id)
    return out
