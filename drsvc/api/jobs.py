"""What the restore and drill resources share: the body, the listing, one job, cancel."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from drsvc.api.auth import Principal
from drsvc.api.errors import ApiError, bad_request, not_found
from drsvc.api.guard import act, in_tenant, principal
from drsvc.api.view import context
from drsvc.jobs import Job, JobFinished, JobKind, JobNotFound

MAX_LIMIT = 500


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; 400 naming what is wrong."""
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", field="") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", field="")
    return body


def limit_param(request: web.Request) -> int:
    text = request.query.get("limit", "50")
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise bad_request(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {text!r}", field="limit")
    return int(text)


def job_body(job: Job) -> dict[str, Any]:
    return job.to_dict()


def scope(who: Principal) -> list[str] | None:
    """The token's tenants, None for every tenant."""
    return None if "*" in who.tenants else list(who.tenants)


async def list_jobs(request: web.Request, kind: JobKind) -> web.Response:
    """The jobs whose tenants are all within the token's scope, as ``find_job`` requires of one job."""
    who = principal(request, "viewer", f"listing {kind}s")
    limit = limit_param(request)
    jobs = context(request).jobs.list(kind=kind, within=scope(who), limit=limit)
    return web.json_response({f"{kind}s": [job_body(j) for j in jobs]})


def find_job(request: web.Request, kind: JobKind, who: Principal) -> Job:
    """The job named in the path, of `kind`, within the caller's tenants (404 / 403 otherwise)."""
    job_id = request.match_info["id"]
    job = context(request).jobs.get(job_id)
    if job is None or job.kind != kind:
        raise not_found(f"no {kind} job {job_id!r}")
    for tenant in job.tenants:
        in_tenant(who, tenant, f"{kind} job {job_id!r}", request)
    return job


async def get_job(request: web.Request, kind: JobKind) -> web.Response:
    who = principal(request, "viewer", f"reading a {kind}")
    return web.json_response(job_body(find_job(request, kind, who)))


async def cancel_job(request: web.Request, kind: JobKind) -> web.Response:
    who = principal(request, "operator", f"cancelling a {kind}")
    job = find_job(request, kind, who)
    if job.done:
        raise ApiError(409, "finished", f"{kind} job {job.id} has already finished ({job.state})")
    await act(request, tenant=job.tenants[0] if job.tenants else None, job=job.id)
    try:
        job = await context(request).runner.cancel(job.id)
    except JobNotFound:
        raise not_found(f"no {kind} job {job.id!r}") from None
    except JobFinished:  # it finished between the look and the cancel
        found = context(request).jobs.get(job.id)
        state = found.state if found is not None else "finished"
        raise ApiError(409, "finished", f"{kind} job {job.id} has already finished ({state})") from None
    return web.json_response(job_body(job))
