"""/v1/restores: start (or dry-run) a restore, list, read one (state, progress, result), cancel.

A restore runs as a job (``drsvc.jobs``) on an App of its own, built from the config of the moment it was
asked for (``DaemonView.job_app``): a config reload does not pull the sites from under it. A dry run is
answered at once from the daemon's App and changes nothing.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from drsvc.api.errors import ApiError
from drsvc.api.guard import act, in_tenant, note, principal
from drsvc.api.jobs import cancel_job, get_job, job_body, json_body, list_jobs
from drsvc.api.view import context
from drsvc.core.errors import ConfigError, DRError, StoreError
from drsvc.jobs import ProgressSink, RunnerClosed
from drsvc.restores import RequestError, parse_restore_request, plan_restore, run_restore

_STATUS = {"unknown_source": 404, "no_restore_roots": 422, "target_outside_roots": 422}


def request_error(exc: RequestError) -> ApiError:
    return ApiError(_STATUS.get(exc.code, 400), exc.code, exc.message, field=exc.field, hint=exc.hint)


def plan_error(exc: DRError) -> ApiError:
    """Why a dry run could not make its plan."""
    if isinstance(exc, ConfigError):
        return ApiError(400, "invalid", exc.message, field=exc.fields.get("key"), hint=exc.hint)
    if isinstance(exc, StoreError):
        return ApiError(503, "unavailable", exc.message, hint=exc.hint)
    return ApiError(422, "not_restorable", exc.message, hint=exc.hint)


async def start_restore(request: web.Request) -> web.Response:
    who = principal(request, "operator", "starting a restore")
    ctx = context(request)
    body = await json_body(request)
    config = ctx.view.config
    source, target = body.get("source"), body.get("target")
    note(request, source=source if isinstance(source, str) else None)
    note(request, target=target if isinstance(target, str) else None)
    if isinstance(source, str) and source in config.sources:  # the tenant first: 403 before any detail
        in_tenant(who, config.sources[source].tenant, f"source {source!r}", request)
    try:
        req = parse_restore_request(body, config)
    except RequestError as exc:
        raise request_error(exc) from None
    tenant = config.sources[req.source].tenant
    if req.dry_run:
        try:
            plan = await plan_restore(ctx.view.reader(), req)
        except DRError as exc:
            raise plan_error(exc) from None
        return web.json_response(plan)
    await act(request, tenant=tenant, source=req.source, target=str(req.target), at=req.at, site=req.site)
    requested_at = ctx.clock()
    view = ctx.view

    async def work(progress: ProgressSink) -> dict[str, Any]:
        async with view.job_app(config) as app:
            return await run_restore(app, req, progress, requested_at)

    try:
        job = await ctx.runner.submit("restore", (tenant,), who.name, req.to_dict(), work)
    except RunnerClosed:
        raise ApiError(503, "draining", "the daemon is stopping: no new restores") from None
    note(request, job=job.id)
    return web.json_response(job_body(job), status=202, headers={"Location": f"/v1/restores/{job.id}"})


async def list_restores(request: web.Request) -> web.Response:
    return await list_jobs(request, "restore")


async def get_restore(request: web.Request) -> web.Response:
    return await get_job(request, "restore")


async def cancel_restore(request: web.Request) -> web.Response:
    return await cancel_job(request, "restore")
