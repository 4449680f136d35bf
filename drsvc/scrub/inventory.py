"""List every site of the tenant, note what the local outbox has still to ship, open the repository
and read what the prune markers condemn."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

from drsvc.core.errors import (
    DRError,
    IntegrityError,
    ObjectNotFound,
    RepositoryError,
    StoreError,
    TransientStoreError,
)
from drsvc.core.layout import Handle, Kind
from drsvc.core.outbox import Outbox
from drsvc.core.repository import Repository
from drsvc.core.segments import SegmentName
from drsvc.scrub.engine import Scrub, ScrubObject, label
from drsvc.scrub.report import FindingKind

# prune markers first; the change logs (segments, WAL) and the evidence (audit batches, drill reports), which
# no other object names; then the reverse of the shipping order
LISTED = (
    Kind.PRUNE,
    Kind.SEGMENT,
    Kind.WAL,
    Kind.AUDIT,
    Kind.DRILL,
    Kind.SNAPSHOT,
    Kind.INDEX,
    Kind.PACK,
    Kind.KEY,
    Kind.CONFIG,
)


async def take_inventory(s: Scrub) -> None:
    state_dir = s.config.state.dir
    before = await asyncio.to_thread(_outbox_pending, state_dir, s.tenant)
    listed = await asyncio.gather(*(_list(s, site) for site in s.site_order))
    after = await asyncio.to_thread(_outbox_pending, state_dir, s.tenant)
    s.in_flight = before | after
    for site, found in zip(s.site_order, listed, strict=True):
        if found is None:
            continue
        if not found:  # not even a config: an NFS mount that is not mounted must not be filled
            s.stores.pop(site)
            s.find(
                site,
                FindingKind.UNREACHABLE,
                "",
                "the site holds no repository for this tenant: is it mounted? (`drsvc init` creates it)",
            )
            continue
        for h, size in found.items():
            o = s.objects.get(h)
            if o is None:
                o = s.objects[h] = ScrubObject(h, s.layout.key(h), label(s.layout, h))
            o.sizes[site] = size
    s.tell("list", len(s.site_order), len(s.site_order))
    if not s.stores:
        raise TransientStoreError(
            "no site of the tenant could be listed: "
            + "; ".join(f"{site}: {d}" for site, d in s.report.unreachable.items()),
            tenant=s.tenant,
        )


async def _list(s: Scrub, site: str) -> dict[Handle, int] | None:
    store = s.app.store(site)
    found: dict[Handle, int] = {}
    try:
        for kind in LISTED:
            async for info in store.list(s.layout.prefix(kind)):
                if info.key.rsplit("/", 1)[-1].startswith("."):
                    continue  # a local site's temporary file
                try:
                    h = s.layout.parse(info.key)
                except RepositoryError:
                    s.find(site, FindingKind.STRAY, info.key, "not an object of this repository")
                    continue
                if h.kind is Kind.SEGMENT and not _segment_name(h.name):
                    s.find(site, FindingKind.STRAY, info.key, "not a change-log segment name")
                    continue
                if h.kind is not Kind.PRUNE:
                    found[h] = info.size
                    continue
                # read now: a prune deletes its markers after its deletions, so a marker read before the
                # packs are listed names every pack that prune may be deleting while we look
                with contextlib.suppress(ObjectNotFound):
                    s.markers.setdefault(h.name, []).append(await store.get(info.key))
    except StoreError as exc:
        s.unreachable(site, exc)
        return None
    s.stores[site] = store
    return found


async def open_repository(s: Scrub) -> None:
    """Open the repository at the first reachable site that can, over all the reachable sites; learn which
    packs the prune markers condemn."""
    errors: list[str] = []
    for site in list(s.stores):  # a site whose config is damaged must not stop the scrub
        try:
            repo = await s.app.open_repo(s.tenant, site)
            break
        except (RepositoryError, StoreError) as exc:
            errors.append(f"{site}: {exc.message}")
    else:
        raise RepositoryError(
            "no reachable site could open the repository: " + "; ".join(errors), tenant=s.tenant
        )
    s.repo = Repository(s.tenant, repo.keys, repo.params, list(s.stores.values()))
    s.tags = {repo.keys.source_tag(n): n for n, sc in s.config.sources.items() if sc.tenant == s.tenant}
    for name, copies in s.markers.items():
        for data in copies:  # a marker that no copy decodes is ignored, by writers and prune alike
            try:
                marker = await asyncio.to_thread(s.repo.decode_prune_marker, name, data)
            except DRError:
                continue
            s.condemned.update(marker.packs)
            break


def _segment_name(name: str) -> bool:
    try:
        SegmentName.parse(name)
    except IntegrityError:
        return False
    return True


def _outbox_pending(state_dir: Path, tenant: str) -> set[tuple[str, str]]:
    """(key, site) pairs the local outbox has still to ship: missing there now is expected, not damage."""
    path = state_dir / "outbox.db"
    if not path.exists():
        return set()
    try:
        outbox = Outbox.open_readonly(path)
        try:
            out: set[tuple[str, str]] = set()
            for key, _sites in outbox.keys(tenant):
                got = outbox.acked_sites(key)
                if got is not None:
                    out.update((key, site) for site in got[1])
            return out
        finally:
            outbox.close()
    except sqlite3.Error:
        return set()
