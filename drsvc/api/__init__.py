"""The HTTP API under /v1 (issue 4): sources, sites, restores, drills; bearer-token auth; audit.

1. ``make_api(context)`` builds the aiohttp sub-application the daemon mounts at ``/v1``
   (``drsvc.http.make_app(..., api=...)``). Its state is one ``ApiContext`` (``view.py``): the daemon view,
   the job store and runner, the audit log, the token table.
2. Each request passes three middlewares, outermost first: ``audit`` (every POST/DELETE ends with an outcome
   record, ``guard.py``), ``errors`` (one JSON error shape, ``errors.py``), ``auth`` (a bearer token, except
   for ``/v1/openapi.json``; ``auth.py``). Handlers then check the role and the tenant they need.
3. A handler that changes something validates first, then calls ``guard.act`` (503 while draining, the
   audit attempt record, 503 if it cannot be written), then acts: a snapshot request to the supervisor, or
   a job (restore, drill) queued on the runner, which runs it on an App of its own.
4. Roles: viewer reads, operator also changes (snapshot, restore, drill, cancel), admin also reads the
   audit log (``GET /v1/audit``, ``auditlog.py``). Everything is scoped to the token's tenants.
5. ``openapi.py`` describes every route, request and answer; the document is served as built.
"""

from __future__ import annotations

from aiohttp import web

from drsvc.api import auditlog, drills, restores, sites, sources
from drsvc.api.errors import errors_middleware
from drsvc.api.guard import audit_middleware, auth_middleware
from drsvc.api.openapi import document
from drsvc.api.view import CONTEXT, ApiContext


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


def make_api(context: ApiContext) -> web.Application:
    """The /v1 sub-application."""
    api = web.Application(middlewares=[audit_middleware, errors_middleware, auth_middleware])
    api[CONTEXT] = context
    r = api.router
    r.add_get("/openapi.json", _openapi, allow_head=False)
    r.add_get("/sources", sources.list_sources, allow_head=False)
    r.add_get("/sources/{source}", sources.get_source, allow_head=False)
    r.add_post("/sources/{source}/snapshots", sources.snapshot_now)
    r.add_get("/sites", sites.list_sites, allow_head=False)
    r.add_get("/restores", restores.list_restores, allow_head=False)
    r.add_post("/restores", restores.start_restore)
    r.add_get("/restores/{id}", restores.get_restore, allow_head=False)
    r.add_delete("/restores/{id}", restores.cancel_restore)
    r.add_get("/drills", drills.list_drills, allow_head=False)
    r.add_post("/drills", drills.start_drill)
    r.add_get("/drills/{id}", drills.get_drill, allow_head=False)
    r.add_delete("/drills/{id}", drills.cancel_drill)
    r.add_get("/drills/{id}/report.html", drills.drill_report_html, allow_head=False)
    r.add_get("/audit", auditlog.get_audit, allow_head=False)
    return api


__all__ = ["ApiContext", "make_api"]
