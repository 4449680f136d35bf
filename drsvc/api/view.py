"""What the API needs from the daemon, as narrow protocols (the supervisor implements them; tests may too).

``DaemonView`` answers from memory for sources and sites, takes a snapshot on request, lends its ``App`` for
reads (snapshot listings, dry-run plans) and builds a fresh ``App`` for each job, so a restore or a drill
does not depend on the supervisor's App surviving a config reload. ``AuditSink`` is the audit log's
blocking append; ``ApiContext`` is everything a handler reaches through ``request.app[CONTEXT]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from drsvc.api.auth import TokenTable
from drsvc.app import App
from drsvc.audit import AuditRecord, AuditVerdict
from drsvc.core.config import Config
from drsvc.jobs import JobRunner, JobStore


@dataclass(frozen=True)
class SourceStatus:
    """One source as the daemon sees it now (times: Unix seconds; None: never)."""

    last_snapshot: float | None
    protected_until: float | None
    last_error: str | None
    snapshot_running: bool
    snapshot_requested: bool


@dataclass(frozen=True)
class SiteStatus:
    """One site as the daemon sees it now; `up` is None for a site no source ships to."""

    up: bool | None
    last_error: str | None
    last_ack: float | None
    backlog_objects: int
    backlog_bytes: int
    oldest: float | None  # when the oldest object waiting for this site was spooled


class DaemonView(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def draining(self) -> bool:
        """Stopping or reloading: mutating requests are refused with 503."""
        ...

    def source_status(self, source: str) -> SourceStatus: ...

    async def site_status(self) -> dict[str, SiteStatus]: ...

    async def snapshot_now(self, source: str) -> SourceStatus:
        """Ask for a snapshot of `source` as soon as the one running (if any) has finished."""
        ...

    def reader(self) -> App:
        """The daemon's App, for reads; raises ApiError 503 while there is none (starting, reloading)."""
        ...

    def job_app(self, config: Config) -> AbstractAsyncContextManager[App]:
        """A fresh App for one job, closed when the job ends."""
        ...


class AuditSink(Protocol):
    """The audit log as the API uses it (``drsvc.audit.AuditLog``): append, and read for ``/v1/audit``."""

    def append(
        self,
        *,
        who: str,
        action: str,
        target: Mapping[str, Any],
        result: str,
        status: int,
        tenant: str | None = None,
        remote: str | None = None,
        request_id: str | None = None,
    ) -> object: ...

    def records(self, since_ns: int = 0) -> Iterable[AuditRecord]:
        """The readable records written at or after `since_ns`, oldest first (blocking)."""
        ...

    def verify(self) -> AuditVerdict:
        """The local log's verdict (blocking)."""
        ...


@dataclass
class ApiContext:
    view: DaemonView
    jobs: JobStore
    runner: JobRunner
    audit: AuditSink
    tokens: TokenTable
    clock: Callable[[], float] = time.time
    public_openapi: bool = True  # /v1/openapi.json without a token


CONTEXT = web.AppKey("drsvc_api_context", ApiContext)


def context(request: web.Request) -> ApiContext:
    return request.config_dict[CONTEXT]
