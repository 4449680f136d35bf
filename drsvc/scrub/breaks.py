"""What the unrecoverable objects break. For a pack: the snapshots whose trees reach a blob that
no copy holds intact, in this pack or any other (found by walking the trees of every record). Then the
alert: one error in the log per unrecoverable object."""

from __future__ import annotations

import asyncio
import datetime

from drsvc.core import format
from drsvc.core.crypto import BlobType
from drsvc.core.errors import DRError, IntegrityError
from drsvc.core.format import SnapshotRecord
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import BlobLocation
from drsvc.scrub.engine import IndexedPack, Scrub, log
from drsvc.scrub.report import snapshot_ref


async def name_breaks(s: Scrub, records: dict[Handle, SnapshotRecord], packs: dict[str, IndexedPack]) -> None:
    """For every unrecoverable pack: the snapshots whose trees reach a blob no copy holds intact."""
    by_label = {u.object: u for u in s.report.unrecoverable}
    lost: dict[bytes, str] = {}
    where: dict[bytes, BlobLocation] = {}
    for name, pk in packs.items():
        o = s.objects[Handle(Kind.PACK, name)]
        if o.label in by_label:
            lost.update((b, o.label) for b in pk.entries.keys() - o.intact)
        else:
            where.update((b, BlobLocation(name, pk.salt, e)) for b, e in pk.entries.items())
    for b in where.keys() & lost.keys():  # stored twice (two workers wrote it): the other copy serves
        del lost[b]
    if not lost:
        return
    for name, pk in packs.items():
        where.update((b, BlobLocation(name, pk.salt, e)) for b, e in pk.entries.items() if b not in where)
    kids: dict[bytes, tuple[list[bytes], set[str]]] = {}  # tree -> (subtrees, lost objects it names)
    stack = [r.tree for r in records.values()]
    while stack:
        tid = stack.pop()
        if tid in kids:
            continue
        loc = where.get(tid)
        if tid in lost or loc is None:
            kids[tid] = ([], {lost[tid]} if tid in lost else set())
            continue
        try:
            nodes = await _tree(s, tid, loc)
        except DRError as exc:
            log.warning("scrub: tree unreadable", extra={"tenant": s.tenant, "error": exc.message})
            kids[tid] = ([], set())
            continue
        subs = [n.subtree for n in nodes if n.kind == format.DIR]
        kids[tid] = (subs, {lost[c] for n in nodes for c in n.content if c in lost})
        stack.extend(subs)
        s.tell("walk", len(kids), len(kids) + len(stack))
    reach: dict[bytes, set[str]] = {}
    for rec in sorted(records.values(), key=lambda r: (r.time_ns, r.id)):
        for label in sorted(_reach(rec.tree, kids, reach)):
            by_label[label].breaks.append(snapshot_ref(rec))


def alert(s: Scrub) -> None:
    for u in s.report.unrecoverable:
        log.error(
            "scrub: no site holds an intact copy",
            extra={
                "tenant": s.tenant,
                "object": u.object,
                "sites": u.sites,
                "detail": u.detail,
                "breaks": [f"snapshot {b.id} of {b.source} at {_iso(b.time_ns)}" for b in u.breaks],
            },
        )


async def _tree(s: Scrub, tid: bytes, loc: BlobLocation) -> list[format.Node]:
    if loc.entry.btype is not BlobType.TREE:
        raise IntegrityError("blob referenced as a tree is not one", blob=tid.hex())
    raw = await s.repo.fetch(
        Handle(Kind.PACK, loc.pack),
        lambda b: s.repo.open_blob(loc, b, tid),
        loc.entry.offset,
        loc.entry.length,
    )
    return await asyncio.to_thread(format.decode_tree, raw, f"tree {tid.hex()}")


def _reach(
    root: bytes, kids: dict[bytes, tuple[list[bytes], set[str]]], memo: dict[bytes, set[str]]
) -> set[str]:
    """The lost objects a tree reaches, computed bottom-up without recursion (trees can be deep)."""
    stack: list[tuple[bytes, bool]] = [(root, False)]
    entered: set[bytes] = set()
    while stack:
        tid, expanded = stack.pop()
        subs, direct = kids.get(tid, ([], set()))
        if expanded:
            memo[tid] = direct.union(*(memo.get(s, set()) for s in subs))
        elif tid not in memo and tid not in entered:  # `entered`: a cycle cannot loop
            entered.add(tid)
            stack.append((tid, True))
            stack.extend((s, False) for s in subs)
    return memo.get(root, set())


def _iso(time_ns: int) -> str:
    if not time_ns:
        return "an unknown time"
    return datetime.datetime.fromtimestamp(time_ns / 1e9, datetime.UTC).isoformat(timespec="seconds")
