"""The API's side of the daemon: what outlives a config reload, and the view of the Supervisor running now.

1. ``DaemonApi(config, metrics)`` opens the job store (``<state.dir>/jobs.sqlite``; jobs a previous stop
   interrupted are failed-interrupted) and its runner (``api.max_restores``), the audit log, the token table
   (an unusable tokens file refuses the start) and the TLS context (``tls_context``). The staging
   directories of the interrupted restores (a daemon killed mid-restore leaves a partial copy of tenant data
   beside the target) are removed before any new job can start (``remove_restore_leftovers``).
2. ``start()`` expires old audit files once (``audit.keep``), then runs the audit task: every
   ``AUDIT_REPLICATE_EVERY`` seconds ``audit_once()`` ships the records the audit tenant's sites do not hold
   yet and, every ``AUDIT_EXPIRE_EVERY`` seconds of the clock, expires old files again. A failure is logged
   and tried again at the next round.
3. ``attach(supervisor)``/``detach()`` around each Supervisor's life: while none is attached (starting,
   reloading, stopping) the API answers 503. ``reload(config)`` (SIGHUP) reads the tokens and the TLS
   certificate again and takes the new ``audit.keep``.
4. ``close()``: no more changes, running jobs become failed-interrupted, the audit log is shipped one last
   time, everything is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import ssl
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from aiohttp import web

from drsvc.api import ApiContext, make_api
from drsvc.api.auth import TokenTable
from drsvc.api.errors import ApiError
from drsvc.api.view import SiteStatus, SourceStatus
from drsvc.app import App
from drsvc.audit import audit_dir, open_log
from drsvc.audit import replicate as ship_audit
from drsvc.core.config import Config
from drsvc.core.errors import ConfigError
from drsvc.jobs import Job, JobRunner, JobStore
from drsvc.metrics import Metrics
from drsvc.site_loop import SiteLoop, request_observer

log = logging.getLogger("drsvc.supervisor")

AUDIT_REPLICATE_EVERY = 60.0  # seconds between shipments of the audit log to the audit tenant's sites
AUDIT_EXPIRE_EVERY = 86400.0  # seconds (of the clock) between expiries of audit files older than audit.keep


class Running(Protocol):
    """What the API reads of the Supervisor running now (``drsvc.supervisor.Supervisor``)."""

    @property
    def app(self) -> App: ...

    @property
    def sites(self) -> Mapping[str, SiteLoop]: ...

    def source_status(self, source: str) -> SourceStatus | None:
        """None for a source it does not run (yet)."""
        ...

    def request_snapshot(self, source: str) -> object: ...


def tls_context(config: Config) -> ssl.SSLContext | None:
    """A server context for ``[api] tls_cert``/``tls_key`` (TLS 1.2 at least), or None when not set."""
    api = config.api
    if api.tls_cert is None or api.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, api.tls_cert, api.tls_key)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {str(cert)!r} and key {str(key)!r}: {exc}", key="api.tls_cert"
        ) from None


STAGING_MARK = ".drsvc-restore-"  # restore.Staging: .<target name>.drsvc-restore-<12 hex>[.<scratch>]


def _staging_names(target: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(target.name)}{re.escape(STAGING_MARK)}[0-9a-f]{{12}}(\.[^/]+)?$")


def remove_restore_leftovers(jobs: Iterable[Job], config: Config) -> list[str]:
    """Remove the staging (and scratch) directories that the interrupted restore `jobs` left beside their
    targets: exactly ``.<target name>.drsvc-restore-<12 hex>`` and ``...<12 hex>.<scratch>``, real
    directories (never a symlink), in a target's parent inside ``[restore] roots``. Logs each one removed,
    and each that could not be; returns the paths removed. The target itself is never touched: a restore
    puts its tree there only when it is complete."""
    removed: list[str] = []
    for job in jobs:
        text = job.request.get("target") if job.kind == "restore" else None
        if not isinstance(text, str) or not os.path.isabs(text):
            continue
        target = Path(text)
        if not target.name or target.parent == target:
            continue
        try:
            if not config.restore.roots:
                raise ConfigError("no restore roots are configured", key="restore.roots")
            parent = config.restore.check_target(target.parent)  # symlinks resolved: scan what was judged
        except ConfigError as exc:  # not where today's config lets restores write: leave it, say so
            log.warning(
                "the staging directories of an interrupted restore were not looked for",
                extra={"job": job.id, "target": text, "error": exc.message},
            )
            continue
        names = _staging_names(target)
        try:
            entries = [e.name for e in os.scandir(parent) if names.match(e.name)]
        except OSError:
            continue  # the parent is gone: so is what was in it
        for name in entries:
            path = os.path.join(parent, name)
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    continue
                shutil.rmtree(path)  # fd-based on Linux: does not follow symlinks inside
            except OSError as exc:
                log.error(
                    "cannot remove the staging directory of an interrupted restore",
                    extra={"job": job.id, "path": path, "error": exc.strerror or str(exc)},
                )
                continue
            removed.append(path)
            log.warning(
                "removed the staging directory of an interrupted restore (a partial copy)",
                extra={"job": job.id, "path": path, "target": text},
            )
    return removed


class DaemonApi:
    """Jobs, audit log, tokens and TLS of the API, and its view of the Supervisor running now."""

    def __init__(self, config: Config, metrics: Metrics, *, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self.metrics = metrics
        self.clock = clock
        self.supervisor: Running | None = None
        self.stopping = False
        self.tls = tls_context(config)
        tokens = TokenTable.from_config(config)  # an unusable tokens file refuses the start
        self.jobs = JobStore(config.state.dir / "jobs.sqlite", clock=clock)
        self.runner = JobRunner(self.jobs, config.api.max_restores)
        self.audit = open_log(config, clock=clock)
        self.context = ApiContext(self, self.jobs, self.runner, self.audit, tokens, clock)
        self._audit_app: App | None = None
        self._auditor: asyncio.Task[None] | None = None
        self._audit_stop = asyncio.Event()  # set to stop the audit task
        self._expired_at: float | None = None  # clock time of the last audit expiry (None: not yet)
        if self.jobs.interrupted:
            log.warning("jobs interrupted by the last stop", extra={"jobs": self.jobs.interrupted})
            found = [j for j in map(self.jobs.get, self.jobs.interrupted) if j is not None]
            self.leftovers_removed = remove_restore_leftovers(found, config)
        else:
            self.leftovers_removed = []

    def web_app(self) -> web.Application:
        """The /v1 application for ``drsvc.http.make_app(..., api=...)``."""
        return make_api(self.context)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def attach(self, supervisor: Running) -> None:
        self.supervisor, self._config = supervisor, supervisor.app.config

    def detach(self) -> None:
        self.supervisor = None

    def reload(self, config: Config) -> None:
        """SIGHUP: the tokens (config and tokens file) and the TLS certificate are read again; an unusable
        tokens file keeps the tokens in force; a new ``audit.keep`` applies to the next expiry. A new
        max_restores, audit dir or audit hash applies at the next start."""
        try:
            self.context.tokens = TokenTable.from_config(config)
        except ConfigError as exc:
            log.error("tokens not reloaded; the previous ones stay in force", extra={"error": str(exc)})
        self._config = config
        if self.tls is not None and config.api.tls_cert is not None and config.api.tls_key is not None:
            try:
                _load_chain(self.tls, config.api.tls_cert, config.api.tls_key)  # new connections
            except ConfigError as exc:
                log.error("TLS certificate not reloaded", extra={"error": str(exc)})
        elif (self.tls is None) != (config.api.tls_cert is None):
            log.warning("turning TLS on or off takes a restart of the daemon")
        if config.api.max_restores != self.runner.max_running:
            log.warning("api.max_restores changes at the next start of the daemon")
        self.audit.keep_s = config.audit.keep  # a longer keep must hold before the next expiry deletes
        if audit_dir(config) != self.audit.dir or config.audit.hash != self.audit.hash:
            log.warning("audit.dir and audit.hash change at the next start of the daemon")

    async def start(self) -> None:
        """Expire old audit files once, then start the audit task (replication, daily expiry)."""
        await self.expire_audit()
        self._auditor = asyncio.create_task(self._audit_loop(), name="audit-replication")

    async def close(self) -> None:
        """Shutdown: no more requests that change anything; running jobs become failed-interrupted; the audit
        log is shipped one last time."""
        self.stopping = True
        await self.runner.close()
        self._audit_stop.set()
        if self._auditor is not None:
            await asyncio.gather(self._auditor, return_exceptions=True)
        try:
            await self.replicate_audit()
        except Exception as exc:
            log.error("audit log not replicated at shutdown", extra={"error": str(exc)})
        if self._audit_app is not None:
            await self._audit_app.close()
            self._audit_app = None
        await asyncio.to_thread(self.audit.close)
        await asyncio.to_thread(self.jobs.close)

    # -- the audit log -----------------------------------------------------------------------------------
    async def replicate_audit(self) -> None:
        """Ship the audit records the audit tenant's sites do not hold yet (nothing without a tenant)."""
        if self._config.audit.tenant is None:
            return
        if self._audit_app is not None and self._audit_app.config is not self._config:
            await self._audit_app.close()  # the config was reloaded
            self._audit_app = None
        if self._audit_app is None:
            self._audit_app = App(self._config, workers=1, observer=request_observer(self.metrics))
        for s in await ship_audit(self._audit_app, self.audit):
            if s.error is not None:
                log.warning("audit log not shipped to a site", extra={"site": s.site, "error": s.error})

    async def expire_audit(self) -> list[str]:
        """Delete the audit files whose records are all older than ``audit.keep`` (never the newest file) and
        log their names; a failure is logged and tried again at the next expiry. The names deleted."""
        self._expired_at = self.clock()
        try:
            tenant = self.config.audit.tenant
            shipped_to = self.config.tenant_sites(tenant) if tenant is not None else []
            gone = await asyncio.to_thread(self.audit.expire, shipped_to)
        except Exception:
            log.exception("audit expiry failed", extra={"dir": str(self.audit.dir)})
            return []
        if gone:
            log.info(
                "audit files expired",
                extra={"files": gone, "dir": str(self.audit.dir), "keep_days": self.audit.keep_s / 86400},
            )
        return gone

    async def audit_once(self) -> None:
        """One round of the audit task: replicate, and expire when AUDIT_EXPIRE_EVERY has passed."""
        try:
            await self.replicate_audit()
        except Exception:
            log.exception("audit replication failed")
        if self._expired_at is None or self.clock() - self._expired_at >= AUDIT_EXPIRE_EVERY:
            await self.expire_audit()

    async def _audit_loop(self) -> None:
        while not self._audit_stop.is_set():
            try:
                await asyncio.wait_for(self._audit_stop.wait(), AUDIT_REPLICATE_EVERY)
                return
            except TimeoutError:
                pass
            await self.audit_once()

    # -- DaemonView ----------------------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        return self._config

    @property
    def draining(self) -> bool:
        return self.stopping or self.supervisor is None

    def _running(self) -> Running:
        if self.supervisor is None:
            raise ApiError(503, "unavailable", "the daemon is starting, reloading or stopping; try again")
        return self.supervisor

    def source_status(self, source: str) -> SourceStatus:
        st = self._running().source_status(source)
        if st is None:  # in the config being loaded, not yet in the supervisor
            return SourceStatus(None, None, None, False, False)
        return st

    async def site_status(self) -> dict[str, SiteStatus]:
        sup = self._running()
        outbox = sup.app.spool.outbox
        out = {}
        for name in self._config.sites:
            b = await asyncio.to_thread(outbox.backlog, name)
            loop = sup.sites.get(name)
            out[name] = SiteStatus(
                up=None if loop is None else loop.up,
                last_error=b.last_error if loop is None else loop.last_error,
                last_ack=None if loop is None else loop.last_ack,
                backlog_objects=b.objects,
                backlog_bytes=b.bytes,
                oldest=b.oldest,
            )
        return out

    async def snapshot_now(self, source: str) -> SourceStatus:
        sup = self._running()
        if sup.source_status(source) is None:
            raise ApiError(503, "unavailable", f"source {source!r} is not running yet; try again")
        sup.request_snapshot(source)
        return self.source_status(source)

    def reader(self) -> App:
        return self._running().app

    def job_app(self, config: Config) -> contextlib.AbstractAsyncContextManager[App]:
        return App(config, observer=request_observer(self.metrics))
