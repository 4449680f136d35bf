"""Moving spooled objects to sites and tracking copies.

1. Every object is sealed once, into the spool; each site of its copy policy gets the same bytes.
2. One ``Shipper`` per site drains that site's outbox queue in order with bounded concurrency; barriers
   (indexes, snapshot records) wait for everything before them at that site.
3. A site acknowledges an object when its ``put`` returns; the spool file goes when every site has it.
4. ``protection`` says which sites hold an object; a snapshot is protected when its record is at
   ``min_copies`` sites (the barrier order makes that imply all its data is there too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from drsvc.core.errors import ReplicationError
from drsvc.core.spool import Spool
from drsvc.core.stores import ObjectStore
from replicator.shipper import Shipper, ShipReport

__all__ = ["Protection", "ShipReport", "Shipper", "protection", "replicate"]


@dataclass(frozen=True)
class Protection:
    key: str
    holding: tuple[str, ...]
    lacking: tuple[str, ...]
    min_copies: int

    @property
    def protected(self) -> bool:
        return len(self.holding) >= self.min_copies


def protection(
    spool: Spool, key: str, sites: Sequence[str], min_copies: int, targets: Sequence[str] | None = None
) -> Protection:
    """Which of `sites` hold `key`. `targets`: the sites the object was spooled for (default `sites`); an
    object gone from the outbox is held by those targets, and only by those that are still in `sites`."""
    wanted = set(sites)
    state = spool.outbox.acked_sites(key)
    if state is None:  # gone from the outbox: every target site acknowledged it
        held = [s for s in (targets if targets is not None else sites) if s in wanted]
        return Protection(key, tuple(held), tuple(s for s in sites if s not in held), min_copies)
    holding, _lacking = state
    held = [s for s in holding if s in wanted]
    return Protection(key, tuple(held), tuple(s for s in sites if s not in held), min_copies)


async def replicate(
    spool: Spool,
    stores: Sequence[ObjectStore],
    concurrency: Mapping[str, int] | None = None,
    done: asyncio.Event | None = None,
) -> list[ShipReport]:
    """Ship the backlog to every site in parallel (following new objects until `done`, if given).

    A spooled object that went missing locally is copied from a site that holds it (the others in `stores`).
    """
    limits = concurrency or {}
    shippers = [
        Shipper(s, spool, limits.get(s.name, 4), peers=[p for p in stores if p is not s]) for s in stores
    ]
    if done is None:
        return list(await asyncio.gather(*(s.run_once() for s in shippers)))
    loop = asyncio.get_running_loop()

    def wake() -> None:  # called from the spooling thread
        for s in shippers:
            loop.call_soon_threadsafe(s.wakeup.set)

    unsubscribe = spool.subscribe(wake)
    try:
        return list(await asyncio.gather(*(s.follow(done) for s in shippers)))
    finally:
        unsubscribe()


def require_protected(p: Protection, reports: Sequence[ShipReport], source: str) -> None:
    if p.protected:
        return
    errors = {r.site: r.error for r in reports if r.error}
    detail = "; ".join(f"{site}: {errors.get(site, 'not acknowledged')}" for site in p.lacking)
    raise ReplicationError(
        f"snapshot reached {len(p.holding)} of the {p.min_copies} sites required (min_copies); "
        f"failed: {detail}",
        source=source,
        holding=",".join(p.holding) or "none",
    )
