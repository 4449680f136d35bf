"""One shipper per site: moves spooled objects to that site, in outbox order, with bounded concurrency.

The store it is given is already wrapped (retry, throttle, faults: ``drsvc.core.stores.compose``). An object
whose upload still fails after the wrapper's retries is recorded in the outbox (attempts, last error) and the
shipper stops its pass: the site is treated as down and the object stays spooled for the next pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from drsvc.core.errors import ObjectNotFound, StoreError
from drsvc.core.outbox import Pending
from drsvc.core.spool import Spool
from drsvc.core.stores import ObjectStore


@dataclass
class ShipReport:
    site: str
    shipped: int = 0
    bytes: int = 0
    error: str | None = None
    seconds: float = 0.0
    errors_by_kind: dict[str, int] = field(default_factory=dict)


class Shipper:
    def __init__(
        self, store: ObjectStore, spool: Spool, concurrency: int = 4, peers: Sequence[ObjectStore] = ()
    ) -> None:
        self.store = store
        self.peers = list(peers)
        self.site = store.name
        self.spool = spool
        self.concurrency = concurrency
        self.wakeup = asyncio.Event()
        self.on_ack: Callable[[], None] | None = None  # told after each acknowledged object (on the loop)

    async def _ship_one(self, p: Pending) -> int:
        try:
            await self.store.put_file(p.key, self.spool.path(p.key))  # streamed: no object held in memory
        except ObjectNotFound as exc:
            if exc.fields.get("site") != self.site or "source file" not in exc.message:
                raise
            data = await self._from_peer(p.key)
            if len(data) != p.size:
                raise ObjectNotFound(
                    f"the copy at another site is {len(data)} bytes, the spooled object was {p.size}",
                    key=p.key,
                    site=self.site,
                    hint="run `drsvc check --read-data` on every site",
                ) from exc
            await self.store.put(p.key, data)
        if await asyncio.to_thread(self.spool.outbox.ack, p.seq, self.site):
            await asyncio.to_thread(self.spool.shipped, p.seq, p.key)
        if self.on_ack is not None:
            self.on_ack()
        return p.size

    async def _from_peer(self, key: str) -> bytes:
        """The spool lost this object (a damaged state directory): copy it from a site that has it."""
        state = await asyncio.to_thread(self.spool.outbox.acked_sites, key)
        holding = set(state[0]) if state else set()
        for peer in self.peers:
            if peer.name in holding:
                try:
                    return await peer.get(key)
                except StoreError:
                    continue
        raise ObjectNotFound(
            "spooled object is missing and no other site holds it",
            key=key,
            site=self.site,
            hint="the local spool was damaged before this object reached any site: take a new snapshot",
        )

    async def run_once(self) -> ShipReport:
        """Ship everything pending for this site now; stop at the first object that cannot be shipped."""
        report = ShipReport(self.site)
        started = time.monotonic()
        in_flight: dict[asyncio.Task[int], Pending] = {}
        failed = False
        try:
            while True:
                if not failed and len(in_flight) < self.concurrency:
                    exclude = [p.seq for p in in_flight.values()]
                    todo = await asyncio.to_thread(
                        self.spool.outbox.pending, self.site, self.concurrency - len(in_flight), exclude
                    )
                    for p in todo:
                        in_flight[asyncio.create_task(self._ship_one(p))] = p
                if not in_flight:
                    break
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    p = in_flight.pop(task)
                    exc = task.exception()
                    if exc is None:
                        report.shipped += 1
                        report.bytes += task.result()
                    elif isinstance(exc, StoreError):
                        failed = True
                        kind = type(exc).__name__
                        report.errors_by_kind[kind] = report.errors_by_kind.get(kind, 0) + 1
                        report.error = report.error or exc.message
                        await asyncio.to_thread(self.spool.outbox.fail, p.seq, self.site, str(exc))
                    else:
                        raise exc
        finally:
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
        report.seconds = time.monotonic() - started
        return report

    async def follow(self, done: asyncio.Event, poll: float = 0.5) -> ShipReport:
        """Ship as objects arrive until `done` is set and nothing is left (or the site fails)."""
        total = ShipReport(self.site)
        started = time.monotonic()
        while True:
            finished = done.is_set()
            r = await self.run_once()
            total.shipped += r.shipped
            total.bytes += r.bytes
            for k, v in r.errors_by_kind.items():
                total.errors_by_kind[k] = total.errors_by_kind.get(k, 0) + v
            if r.error:
                total.error = r.error
                break
            if finished:
                break
            self.wakeup.clear()
            try:
                await asyncio.wait_for(_either(self.wakeup, done), poll)
            except TimeoutError:
                pass
        total.seconds = time.monotonic() - started
        return total


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    ta, tb = asyncio.create_task(a.wait()), asyncio.create_task(b.wait())
    try:
        await asyncio.wait([ta, tb], return_when=asyncio.FIRST_COMPLETED)
    finally:
        ta.cancel()
        tb.cancel()
