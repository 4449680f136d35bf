"""/v1/drills: start a drill (a plan in the body, or a plan file by name), list, read one, its HTML report.

``{"plan": {...}}`` is a plan table as JSON (drsvc/drill/plan.py); ``{"plan_file": "weekly"}`` names
``<[drill] dir>/plans/weekly.toml`` (default dir ``<state.dir>/drills``): only a bare name, never a path. A
plan's scratch directory must lie inside ``[restore] roots``; with no roots configured, only the default
scratch (under the drill dir) is accepted. The job's result holds the drill's report; ``report.html`` renders
it.

Starting a drill, in this order:

1. The plan's sources, before anything else is judged: each must be a source of the token's tenants. A
   source of another tenant, and (for a token not scoped to every tenant) an unknown one, is 403 with one
   message naming only the source given and the token's own tenants, so that the answer tells nothing about
   other tenants (not even whether the source exists). Only then is the plan parsed, so its errors (a bad
   site, a bad point) can only be about the caller's own sources.
2. An inline plan may not contain postgres ``probes`` (400 ``invalid_plan``, field
   ``plan.sources[i].probes``): a probe is SQL run by ``psql`` as the restored cluster's superuser, whose
   answer comes back in the report, which is arbitrary code on the daemon's host (``COPY ... TO PROGRAM``).
   Probes come only from plan files, which whoever administers the host writes.
3. Parse and check the plan (400 naming the key), the scratch directory (422), then the audit attempt record
   and the job.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from drsvc.api.auth import Principal, out_of_scope
from drsvc.api.errors import ApiError, bad_request, not_found
from drsvc.api.guard import act, audit_tenant, in_tenant, note, principal
from drsvc.api.jobs import cancel_job, find_job, get_job, job_body, json_body, list_jobs
from drsvc.api.view import context
from drsvc.core.config import Config
from drsvc.core.errors import ConfigError
from drsvc.drill.plan import Plan, load_plan, parse_plan
from drsvc.drill.report import render_html, report_dir
from drsvc.drill.runner import run_drill
from drsvc.jobs import ProgressSink, RunnerClosed

_PLAN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}(\.toml)?$")


def plans_dir(config: Config) -> Path:
    return report_dir(config) / "plans"


def _plan_error(exc: ConfigError) -> ApiError:
    return ApiError(400, "invalid_plan", exc.message, field=exc.fields.get("key"), hint=exc.hint)


def _source_entries(table: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
    """The plan's ``sources`` entries that are tables, with their index (the parser judges the rest)."""
    sources = table.get("sources")
    if not isinstance(sources, list):
        return []
    return [(i, entry) for i, entry in enumerate(sources) if isinstance(entry, Mapping)]


def _check_scope(table: Mapping[str, Any], config: Config, who: Principal, request: web.Request) -> None:
    """Step 1: every source the plan names is a source of the token's tenants (see the module docstring)."""
    for i, entry in _source_entries(table):
        name = entry.get("source")
        if not isinstance(name, str):
            continue
        field = f"plan.sources[{i}].source"
        sc = config.sources.get(name)
        if sc is None and "*" in who.tenants:  # every source is the caller's: it may know what exists
            raise ApiError(
                400,
                "invalid_plan",
                f"drill plan: no source {name!r} in the config; configured: "
                f"{', '.join(sorted(config.sources)) or 'none'}",
                field=field,
            )
        if sc is None or not who.sees(sc.tenant):
            if sc is not None:
                audit_tenant(request, sc.tenant)
            mine = sorted(n for n, s in config.sources.items() if who.sees(s.tenant))
            refused = out_of_scope(who, f"source {name!r} of the drill plan").message
            raise ApiError(
                403, "forbidden", f"{refused}; its sources: {', '.join(mine) or 'none'}", field=field
            )


def _refuse_probes(table: Mapping[str, Any]) -> None:
    """Step 2: no postgres probes in an inline plan."""
    for i, entry in _source_entries(table):
        if entry.get("probes"):
            raise ApiError(
                400,
                "invalid_plan",
                "an inline drill plan may not contain probes: a probe is SQL run as the restored cluster's "
                "superuser; probes come only from plan files in the drill directory's plans/ (plan_file)",
                field=f"plan.sources[{i}].probes",
                hint='put the plan in <[drill] dir>/plans/NAME.toml and start it with {"plan_file": "NAME"}',
            )


def _read_toml(path: Path) -> dict[str, Any]:
    """A plan file's table, for the scope check before it is parsed (load_plan reads it again)."""
    try:
        return tomllib.loads(path.read_bytes().decode())
    except OSError as exc:
        raise ConfigError(f"cannot read the drill plan: {exc.strerror}", key="plan_file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the drill plan is not valid TOML: {exc}", key="plan_file") from None


async def _read_plan(
    body: dict[str, Any], config: Config, who: Principal, request: web.Request
) -> tuple[Plan, dict[str, Any]]:
    """The checked plan and what the job records as its request (steps 1 to 3 of the module docstring)."""
    extra = sorted(set(body) - {"plan", "plan_file"})
    if extra:
        raise bad_request(f"unknown field {extra[0]!r}; expected plan or plan_file", field=extra[0])
    if ("plan" in body) == ("plan_file" in body):
        raise bad_request("give either plan (a plan table) or plan_file (a plan's name)", field="plan")
    if "plan" in body:
        table = body["plan"]
        if not isinstance(table, dict):
            raise bad_request("plan must be a JSON object (a drill plan table)", field="plan")
        _check_scope(table, config, who, request)
        _refuse_probes(table)
        try:
            return parse_plan(table, config), {"plan": table}
        except ConfigError as exc:
            raise _plan_error(exc) from None
    name = body["plan_file"]
    if not isinstance(name, str) or not _PLAN_NAME.match(name):
        raise bad_request(
            "plan_file must be the bare name of a plan in the plans directory (letters, digits, '-', '_')",
            field="plan_file",
        )
    path = plans_dir(config) / (name if name.endswith(".toml") else f"{name}.toml")
    if not await asyncio.to_thread(path.is_file):
        raise not_found(f"no drill plan {name!r} in {plans_dir(config)}")
    try:
        _check_scope(await asyncio.to_thread(_read_toml, path), config, who, request)
        return await asyncio.to_thread(load_plan, path, config), {"plan_file": name, "path": str(path)}
    except ConfigError as exc:
        raise _plan_error(exc) from None


def _check_scratch(plan: Plan, config: Config) -> None:
    default = report_dir(config) / "scratch"
    if not config.restore.roots and plan.scratch != default:
        raise ApiError(
            422,
            "no_restore_roots",
            f"scratch {str(plan.scratch)!r}: no restore roots are configured, so a drill started over the "
            f"API may only use the default scratch {str(default)!r}",
            field="plan.scratch",
        )
    try:
        config.restore.check_target(plan.scratch)
    except ConfigError as exc:
        raise ApiError(422, "scratch_outside_roots", exc.message, field="plan.scratch") from None


async def start_drill(request: web.Request) -> web.Response:
    who = principal(request, "operator", "starting a drill")
    ctx = context(request)
    config = ctx.view.config
    body = await json_body(request)
    if isinstance(body.get("plan_file"), str):
        note(request, plan_file=body["plan_file"])
    plan, recorded = await _read_plan(body, config, who, request)
    tenants = list(dict.fromkeys(sp.tenant for sp in plan.sources))
    for tenant in tenants:  # checked before parsing already; the plan file may have changed since
        in_tenant(who, tenant, f"drill plan {plan.name!r}", request)
    _check_scratch(plan, config)
    await act(
        request,
        tenant=tenants[0],
        plan=plan.name,
        sources=[sp.source for sp in plan.sources],
        tenants=tenants,
    )
    view = ctx.view

    async def work(progress: ProgressSink) -> dict[str, Any]:
        async with view.job_app(config) as app:
            outcome = await run_drill(app, plan, progress)
        doc = outcome.report
        return {
            "drill": doc.get("id"),
            "verdict": doc.get("verdict"),
            "level": doc.get("level"),
            "misses": doc.get("misses", []),
            "evidence": dict(outcome.evidence),
            "report": doc,
        }

    try:
        job = await ctx.runner.submit("drill", tenants, who.name, recorded, work)
    except RunnerClosed:
        raise ApiError(503, "draining", "the daemon is stopping: no new drills") from None
    note(request, job=job.id)
    return web.json_response(job_body(job), status=202, headers={"Location": f"/v1/drills/{job.id}"})


async def list_drills(request: web.Request) -> web.Response:
    return await list_jobs(request, "drill")


async def get_drill(request: web.Request) -> web.Response:
    return await get_job(request, "drill")


async def cancel_drill(request: web.Request) -> web.Response:
    return await cancel_job(request, "drill")


async def drill_report_html(request: web.Request) -> web.Response:
    who = principal(request, "viewer", "reading a drill report")
    job = find_job(request, "drill", who)
    report = (job.result or {}).get("report")
    if not isinstance(report, dict):
        if not job.done:
            raise ApiError(
                409, "not_finished", f"drill {job.id} is {job.state}: its report is not written yet"
            )
        raise not_found(f"drill {job.id} ended {job.state} without a report")
    page = await asyncio.to_thread(render_html, report)
    return web.Response(text=page, content_type="text/html", charset="utf-8")
