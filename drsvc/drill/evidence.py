"""Drill reports kept on the sites as evidence, sealed per tenant.

1. ``store_evidence(app, report)`` groups the report's scenarios by tenant. Each tenant gets its own copy
   (``tenant_report``): only its scenarios, their failures as its misses, its own verdict and GB/T 20988
   level, and the whole drill's verdict and level number under ``overall``: one department never reads
   another's source names or results.
2. The copy is JSON, sealed with the tenant's keys as an object of type DRILL (9) named by the report id, and
   put at ``<tenant>/drills/<report id>`` on every site of the tenant (``config.tenant_sites``).
3. A site that refuses the write does not fail the drill: the result maps each site to ``"ok"`` or the error.
4. ``load_evidence(app, tenant, site, report_id)`` reads one copy from one site and checks its seal (an
   altered object raises IntegrityError), its kind, version, id and tenant.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from drsvc.app import App
from drsvc.core.crypto import ObjectType, open_object, seal_object
from drsvc.core.errors import DRError, IntegrityError
from drsvc.core.layout import Handle, Kind
from drsvc.drill.levels import gbt20988_level

KIND = "drsvc-drill-report"
VERSION = 1


def tenant_report(report: dict[str, Any], tenant: str) -> dict[str, Any]:
    """The part of `report` that `tenant` may read: its scenarios and the overall verdict and level."""
    mine = [s for s in report.get("scenarios") or [] if s.get("tenant") == tenant]
    misses = [
        f"{s.get('source')} at {s.get('site')} ({s.get('point')}): {f}"
        for s in mine
        for f in s.get("failures") or []
    ]
    level = report.get("level") or {}
    return {
        "kind": KIND,
        "v": VERSION,
        "tenant": tenant,
        "id": report["id"],
        "plan": report.get("plan"),
        "started": report.get("started"),
        "finished": report.get("finished"),
        "verdict": "pass" if mine and all(s.get("verdict") == "pass" for s in mine) else "fail",
        "misses": misses,
        "level": gbt20988_level(mine),
        "overall": {"verdict": report.get("verdict"), "gbt20988": level.get("gbt20988")},
        "scenarios": mine,
    }


def _tenants(report: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(str(s["tenant"]) for s in report.get("scenarios") or [] if s.get("tenant")))


async def store_evidence(app: App, report: dict[str, Any]) -> dict[str, str]:
    """Seal each tenant's part of `report` and put it at every site of the tenant. Returns, per site, "ok"
    or what went wrong there (prefixed with the tenant when the site serves several); it never raises for
    a site that is down."""
    handle = Handle(Kind.DRILL, str(report["id"]))  # ValueError for an id that is not hex
    results: dict[str, dict[str, str]] = {}  # site -> tenant -> "ok" or error

    async def one_tenant(tenant: str) -> None:
        sites = app.config.tenant_sites(tenant)
        try:
            repo = await app.open_repo(tenant)
            plaintext = json.dumps(tenant_report(report, tenant), sort_keys=True, separators=(",", ":"))
            sealed = seal_object(repo.keys, ObjectType.DRILL, handle.name, plaintext.encode())
        except DRError as exc:  # no site could open the repository: every site of the tenant says why
            for site in sites:
                results.setdefault(site, {})[tenant] = f"cannot open the repository: {exc}"
            return
        key = repo.layout.key(handle)

        async def put(site: str) -> None:
            try:
                await app.store(site).put(key, sealed)
            except DRError as exc:
                results.setdefault(site, {})[tenant] = str(exc)
            else:
                results.setdefault(site, {})[tenant] = "ok"

        await asyncio.gather(*(put(site) for site in sites))

    tenants = _tenants(report)
    await asyncio.gather(*(one_tenant(t) for t in tenants))
    out: dict[str, str] = {}
    for site, by_tenant in results.items():
        bad = {t: e for t, e in by_tenant.items() if e != "ok"}
        if not bad:
            out[site] = "ok"
        elif len(by_tenant) == 1:
            out[site] = next(iter(bad.values()))
        else:
            out[site] = "; ".join(f"tenant {t}: {e}" for t, e in sorted(bad.items()))
    return out


async def load_evidence(app: App, tenant: str, site: str, report_id: str) -> dict[str, Any]:
    """The sealed copy of report `report_id` for `tenant` at `site`, after checking its seal and contents.
    Raises ObjectNotFound when the site does not hold it, IntegrityError when it was altered."""
    handle = Handle(Kind.DRILL, report_id)
    repo = await app.open_repo(tenant, site)
    data = await app.store(site).get(repo.layout.key(handle))
    plaintext = open_object(repo.keys, ObjectType.DRILL, handle.name, data)
    try:
        body = json.loads(plaintext)
    except ValueError:
        raise IntegrityError("sealed drill report is not JSON", object=report_id, site=site) from None
    if not isinstance(body, dict) or body.get("kind") != KIND or body.get("v") != VERSION:
        raise IntegrityError("not a drill report of a known version", object=report_id, site=site)
    if body.get("id") != report_id or body.get("tenant") != tenant:
        raise IntegrityError("the report's id or tenant does not match its name", object=report_id, site=site)
    return body


async def list_evidence(app: App, tenant: str, site: str) -> list[str]:
    """The ids of the drill reports `site` holds for `tenant`."""
    repo = await app.open_repo(tenant, site)
    return sorted(h.name for h in await repo.list_handles(Kind.DRILL, store=app.store(site)))
