"""The repository config and the key slots, which every reachable site must hold; every copy is
read. The config is repaired first: a local site takes data only where the config is."""

from __future__ import annotations

import asyncio
import functools
import json

from drsvc.core import crypto
from drsvc.core.errors import DRError, IntegrityError, ObjectNotFound, StoreError
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import gather_limited
from drsvc.scrub.engine import SMALL_AT_ONCE, Scrub, ScrubObject
from drsvc.scrub.report import FindingKind
from drsvc.scrub.verify import parse_slot


async def config_and_keys(s: Scrub) -> None:
    h = Handle(Kind.CONFIG)
    cfg = s.objects.setdefault(h, ScrubObject(h, s.layout.key(h), "config"))
    s.expect(cfg, set(s.stores))
    if await s.read(cfg, s.verify_config, every_copy=True) is None:
        s.lost(cfg, "no copy of the repository config verifies")
    await s.repair_copies(cfg, None)  # first: a local site takes data only where the config is
    slots = s.of_kind(Kind.KEY)
    await gather_limited(SMALL_AT_ONCE, [functools.partial(_slot, s, o) for o in slots])
    s.tell("config", 1 + len(slots), 1 + len(slots))


async def _slot(s: Scrub, o: ScrubObject) -> None:
    """A key slot is plaintext: a copy is intact if it parses; if intact copies differ, the one this
    tenant's key material opens is right, and if it opens none of them, nothing is repaired."""
    s.expect(o, set(s.stores))
    copies: dict[str, bytes] = {}
    for site in list(o.sizes):
        try:
            copies[site] = await s.stores[site].get(o.key)
            s.count_read(copies[site])
        except StoreError as exc:
            if not isinstance(exc, ObjectNotFound):
                s.unreachable(site, exc)
            continue
    variants: dict[bytes, list[str]] = {}
    for site, data in copies.items():
        try:
            parse_slot(o.handle.name, s.repo.keys.suite, data)
        except IntegrityError as exc:
            o.failed.add(site)
            o.targets[site] = s.find(site, FindingKind.CORRUPT, o.label, exc.message)
            continue
        variants.setdefault(data, []).append(site)
    good: bytes | None = next(iter(variants)) if len(variants) == 1 else None
    if len(variants) > 1:
        kind, secret = s.app.key_material(s.tenant)
        opens = [v for v in variants if await asyncio.to_thread(_opens, s, v, kind, secret)]
        if len(opens) == 1:
            good = opens[0]
        else:
            for sites in variants.values():
                o.failed.update(sites)
                for site in sites:
                    o.targets[site] = s.find(site, FindingKind.CORRUPT, o.label, "copies differ")
            s.lost(o, "copies differ and this tenant's key opens none: cannot tell which is intact")
            return
    if good is None:
        if copies:
            s.lost(o, "no copy of the key slot parses")
        return
    o.good, o.good_size = variants[good][0], len(good)
    for data, sites in variants.items():
        for site in sites if data != good else ():
            o.targets[site] = s.find(site, FindingKind.CORRUPT, o.label, "differs from the copy that opens")
    await s.repair_copies(o, good)


def _opens(s: Scrub, data: bytes, kind: str, secret: bytes) -> bool:
    try:
        return crypto.open_key_slot(json.loads(data), kind, secret) == s.repo.keys.master
    except DRError:
        return False
