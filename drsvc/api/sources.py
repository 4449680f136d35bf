"""/v1/sources: list, detail (policy, targets, live RPO, last snapshot, restorable range), snapshot now."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from aiohttp import web

from drsvc.api.errors import ApiError, not_found
from drsvc.api.guard import act, in_tenant, principal
from drsvc.api.view import SiteStatus, SourceStatus, context
from drsvc.core.config import Config, SourceConfig
from drsvc.core.errors import DRError

log = logging.getLogger("drsvc.api")

READ_TIMEOUT = 20.0  # detail: reading the sites for snapshots and the restorable range


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _source_config(config: Config, name: str) -> SourceConfig:
    sc = config.sources.get(name)
    if sc is None:
        raise not_found(f"no source {name!r}")
    return sc


def summary(name: str, sc: SourceConfig, st: SourceStatus, now: float) -> dict[str, Any]:
    rpo = None if st.protected_until is None else max(0.0, now - st.protected_until)
    target = sc.rpo_target
    return {
        "name": name,
        "tenant": sc.tenant,
        "type": sc.type,
        "sites": list(sc.sites),
        "min_copies": sc.min_copies,
        "rpo_s": rpo,
        "rpo_target_s": target,
        "rpo_ok": None if target is None else (rpo is not None and rpo <= target),
        "protected_until": st.protected_until,
        "protected_until_at": iso(st.protected_until),
        "last_snapshot": st.last_snapshot,
        "last_snapshot_at": iso(st.last_snapshot),
        "last_error": st.last_error,
        "snapshot_running": st.snapshot_running,
        "snapshot_requested": st.snapshot_requested,
    }


def _policy(sc: SourceConfig) -> dict[str, Any]:
    return {
        "sites": list(sc.sites),
        "min_copies": sc.min_copies,
        "interval_s": sc.interval,
        "at": list(sc.at),
        "watch": sc.watch,
        "rpo_target_s": sc.rpo_target,
        "rto_target_s": sc.rto_target,
        "retention": None if sc.retention is None else sc.retention.model_dump(mode="json"),
    }


def _target(site: str, s: SiteStatus | None, holds: bool | None) -> dict[str, Any]:
    return {
        "site": site,
        "up": None if s is None else s.up,
        "last_error": None if s is None else s.last_error,
        "backlog_objects": 0 if s is None else s.backlog_objects,
        "backlog_bytes": 0 if s is None else s.backlog_bytes,
        "holds_last_snapshot": holds,
    }


async def list_sources(request: web.Request) -> web.Response:
    who = principal(request, "viewer", "listing sources")
    ctx = context(request)
    config, now = ctx.view.config, ctx.clock()
    out = [
        summary(name, sc, ctx.view.source_status(name), now)
        for name, sc in config.sources.items()
        if who.sees(sc.tenant)
    ]
    return web.json_response({"sources": out})


async def get_source(request: web.Request) -> web.Response:
    who = principal(request, "viewer", "reading a source")
    ctx = context(request)
    name = request.match_info["source"]
    config = ctx.view.config
    sc = _source_config(config, name)
    in_tenant(who, sc.tenant, f"source {name!r}")
    body = summary(name, sc, ctx.view.source_status(name), ctx.clock())
    body["policy"] = _policy(sc)
    problems: list[str] = []
    latest: dict[str, Any] | None = None
    holders: set[str] | None = None
    restorable: dict[str, Any] | None = None
    app = ctx.view.reader()
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            if sc.type != "log":
                records, held = await app.snapshots(name)
                if records:
                    rec = records[-1]
                    holders = held.get(rec.id, set())
                    latest = {
                        "id": rec.id,
                        "time": rec.time_ns / 1e9,
                        "time_at": iso(rec.time_ns / 1e9),
                        "partial": rec.partial,
                        "sites": sorted(holders),
                    }
            span = await app.restorable_range(name)
            if span is not None:
                restorable = {
                    "earliest": span[0] / 1e9,
                    "latest": span[1] / 1e9,
                    "earliest_at": iso(span[0] / 1e9),
                    "latest_at": iso(span[1] / 1e9),
                }
    except TimeoutError:
        problems.append(f"the sites did not answer within {READ_TIMEOUT:g} s")
    except DRError as exc:
        problems.append(str(exc))
    sites = await ctx.view.site_status()
    body["targets"] = [_target(s, sites.get(s), None if holders is None else s in holders) for s in sc.sites]
    body["last_snapshot_record"] = latest
    body["restorable"] = restorable
    body["problems"] = problems
    return web.json_response(body)


async def snapshot_now(request: web.Request) -> web.Response:
    who = principal(request, "operator", "taking a snapshot")
    ctx = context(request)
    name = request.match_info["source"]
    sc = _source_config(ctx.view.config, name)
    in_tenant(who, sc.tenant, f"source {name!r}", request)
    if sc.type == "log":
        raise ApiError(
            409,
            "not_snapshotted",
            f"source {name!r} is a log source: the daemon streams it and takes its checkpoints itself",
        )
    await act(request, tenant=sc.tenant, source=name)
    st = await ctx.view.snapshot_now(name)
    body = summary(name, sc, st, ctx.clock())
    return web.json_response(body, status=202, headers={"Location": f"/v1/sources/{name}"})
