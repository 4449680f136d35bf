"""Authentication and the audit trail, as middlewares and one helper every mutating handler calls.

The audit protocol (what an auditor can rely on):

1. Every POST, PUT, PATCH or DELETE under /v1 ends with one **outcome** record: who (the token's name, or
   ``anonymous``), what (method and route), the target (source, job id, restore target path, ...), the
   tenant, the remote address, the HTTP status and the result (``ok``, or ``refused: <code>: <message>``,
   or ``failed: ...``). Refused requests (401, 403, 4xx) are recorded too.
2. A request that changes something first writes an **attempt** record (``result = "attempt"``,
   ``status = 0``, the same ``request_id``) through ``act()``, after it was authenticated, authorised and
   validated and immediately before the change. If that write fails the request answers 503
   ``audit_unavailable`` and nothing happens: no change is ever made without a record of it.
3. The outcome record is written before the response is sent. If it cannot be written for a request that
   changed nothing, the answer is 503 ``audit_unavailable``. If the change was made, the attempt record
   already names who did what, the failure is logged, and the real answer is sent (a 503 would invite the
   client to do it twice).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from drsvc.api.auth import Principal, authenticate, require, require_tenant
from drsvc.api.errors import ERROR, ApiError
from drsvc.api.view import context
from drsvc.core.config import Role

log = logging.getLogger("drsvc.api.audit")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PUBLIC_PATHS = frozenset({"/v1/openapi.json"})


@dataclass
class AuditEntry:
    """What the outcome record of one mutating request will say; handlers add to `target`."""

    request_id: str
    action: str
    target: dict[str, Any] = field(default_factory=dict)
    tenant: str | None = None
    acted: bool = False  # the attempt record was written: the change may have been made


PRINCIPAL = web.RequestKey("drsvc_principal", Principal)
AUDIT = web.RequestKey("drsvc_audit", AuditEntry)


def _action(request: web.Request) -> str:
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else request.path
    return f"{request.method} {route}"


def _result(status: int, error: Mapping[str, Any] | None) -> str:
    if status < 400:
        return "ok"
    word = "refused" if status < 500 else "failed"
    if error is None:
        return f"{word}: HTTP {status}"
    return f"{word}: {error.get('code')}: {error.get('message')}"


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: sees the final response of every mutating request and records it (see the docstring)."""
    if request.method not in MUTATING:
        return await handler(request)
    entry = AuditEntry(request_id=uuid.uuid4().hex, action=_action(request))
    request[AUDIT] = entry
    resp = await handler(request)
    ctx = context(request)
    principal = request.get(PRINCIPAL)
    try:
        await asyncio.to_thread(
            ctx.audit.append,
            who=principal.name if principal is not None else "anonymous",
            action=entry.action,
            target=dict(entry.target),
            result=_result(resp.status, resp.get(ERROR)),
            status=resp.status,
            tenant=entry.tenant,
            remote=request.remote,
            request_id=entry.request_id,
        )
    except Exception:
        log.exception(
            "audit log write failed", extra={"action": entry.action, "request_id": entry.request_id}
        )
        if not entry.acted:
            return ApiError(
                503, "audit_unavailable", "the audit log cannot be written; nothing was done"
            ).response()
    resp.headers["X-Request-Id"] = entry.request_id
    return resp


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /v1 path but the OpenAPI document needs a valid bearer token (401 otherwise)."""
    ctx = context(request)
    if not (request.path in PUBLIC_PATHS and ctx.public_openapi and request.method in ("GET", "HEAD")):
        request[PRINCIPAL] = authenticate(ctx.tokens, request.headers)
    return await handler(request)


def principal(request: web.Request, role: Role, what: str) -> Principal:
    """The authenticated caller, if it holds `role` (403 naming the role otherwise)."""
    who: Principal | None = request.get(PRINCIPAL)
    if who is None:  # a public path cannot reach a handler that needs a role; be safe anyway
        raise ApiError(401, "unauthorized", "no bearer token: send 'Authorization: Bearer <token>'")
    require(who, role, what)
    return who


def audit_tenant(request: web.Request, tenant: str) -> None:
    """Record the tenant a mutating request is about in its audit entry (the first one named stays)."""
    if AUDIT in request:
        entry = request[AUDIT]
        entry.tenant = entry.tenant or tenant


def in_tenant(who: Principal, tenant: str, what: str, request: web.Request | None = None) -> None:
    """403 unless the token is scoped to `tenant` (naming `what` and the token's own tenants, never
    `tenant`); records the tenant in the audit entry."""
    if request is not None:
        audit_tenant(request, tenant)
    require_tenant(who, tenant, what)


def note(request: web.Request, **target: Any) -> None:
    """Add to the target of this request's audit record (no-op for a read)."""
    if AUDIT in request:
        request[AUDIT].target.update({k: v for k, v in target.items() if v is not None})


async def act(request: web.Request, *, tenant: str | None = None, **target: Any) -> None:
    """Right before a change: refuse while the daemon drains (503), write the attempt record (503 if it
    cannot be written), and from then on the change counts as made."""
    ctx = context(request)
    if ctx.view.draining:
        raise ApiError(503, "draining", "the daemon is stopping or reloading; try again in a moment")
    entry = request[AUDIT]
    note(request, **target)
    if tenant is not None:
        entry.tenant = tenant
    who = request.get(PRINCIPAL)
    try:
        await asyncio.to_thread(
            ctx.audit.append,
            who=who.name if who is not None else "anonymous",
            action=entry.action,
            target=dict(entry.target),
            result="attempt",
            status=0,
            tenant=entry.tenant,
            remote=request.remote,
            request_id=entry.request_id,
        )
    except Exception:
        log.exception("audit log write failed", extra={"action": entry.action})
        raise ApiError(
            503, "audit_unavailable", "the audit log cannot be written; the request was not carried out"
        ) from None
    entry.acted = True
