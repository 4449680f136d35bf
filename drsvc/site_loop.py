"""One site's shipper loop in the daemon, and the counting of every request made to a site.

1. ``SiteLoop.run(stop)`` ships the site's backlog from the spool (``replicator.Shipper``) for as long as the
   daemon runs: a pass, then a wait for the next spooled object (or ``IDLE_POLL``). After a failed pass it
   backs off (``BACKOFF_MIN`` doubling to ``BACKOFF_MAX``) and ignores wake-ups until the delay is over, so a
   site that comes back catches up from the spool. ``pass_once()`` is one pass, for tests.
2. ``request_observer(metrics)`` is the ``Observer`` an ``App`` hands to the metered store under each site's
   retries: the latency of every attempt and the kind of every failure ("no such object" is an answer).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import cast

from drsvc.app import App
from drsvc.core.stores import ObjectStore
from drsvc.core.stores.metered import Observer
from drsvc.metrics import Metrics, Op
from replicator import Shipper

log = logging.getLogger("drsvc.supervisor")

BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
IDLE_POLL = 5.0


class SiteLoop:
    """Ships one site's backlog for as long as the daemon runs."""

    def __init__(self, store: ObjectStore, app: App, peers: list[ObjectStore], metrics: Metrics) -> None:
        cfg = app.config.sites[store.name]
        self.site = store.name
        self.shipper = Shipper(store, app.spool, cfg.concurrency, peers)
        self.metrics = metrics
        # with an observer on the App (request_observer) every failed request is counted as it happens;
        # counting the shipper's failures as well would count each last attempt twice
        self.count_errors = app.observer is None
        self.up = True
        self.last_error: str | None = None
        self.last_ack: float | None = None
        self.backoff = BACKOFF_MIN

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.shipper.wakeup.clear()  # before the pass: an object spooled during it wakes the next one
            try:
                failed, delay = await self.pass_once()
            except Exception:  # e.g. the state disk failing: log, count, back off, keep the loop alive
                log.exception("site loop pass failed", extra={"site": self.site})
                self.up, self.last_error = False, "internal error (see the log)"
                failed, delay, self.backoff = True, self.backoff, min(BACKOFF_MAX, self.backoff * 2)
            await _wait_any(stop, self.shipper.wakeup, delay, wake_ok=not failed)

    async def pass_once(self) -> tuple[bool, float]:
        """Ship what is pending and record the site's state; returns (failed, seconds until the next pass)."""
        report = await self.shipper.run_once()
        if report.shipped:
            self.last_ack = time.time()
            self.metrics.site_shipped(self.site, report.bytes)
        for kind, n in report.errors_by_kind.items():
            for _ in range(n if self.count_errors else 0):
                self.metrics.site_error(self.site, kind)
        if report.error:
            if self.up:
                log.warning("site is down", extra={"site": self.site, "error": report.error})
            self.up, self.last_error = False, report.error
            delay, self.backoff = self.backoff, min(BACKOFF_MAX, self.backoff * 2)
        else:
            if not self.up:
                log.info("site is back", extra={"site": self.site})
            self.up, self.last_error, self.backoff = True, None, BACKOFF_MIN
            delay = IDLE_POLL
        self.metrics.site_up(self.site, self.up)
        return bool(report.error), delay


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float, wake_ok: bool) -> None:
    """Sleep until `stop`, or `wake` (unless backing off), or the timeout."""
    waits = [asyncio.ensure_future(stop.wait())]
    if wake_ok:
        waits.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def observe(metrics: Metrics, site: str, op: str, seconds: float, error: str | None) -> None:
    """One request (one attempt) to a site: its latency, and its failure kind if it failed."""
    metrics.observe_request(site, cast(Op, op), seconds)  # observe_request rejects an unknown op
    if error is not None and error != "ObjectNotFound":  # "no such object" is an answer, not a failure
        metrics.site_error(site, error)


def request_observer(metrics: Metrics) -> Observer:
    """``observe`` for an App built before its Supervisor: ``App(config, observer=...)``."""
    return functools.partial(observe, metrics)
