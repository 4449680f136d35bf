"""/v1/sites: each site serving the caller's tenants, with its health, backlog and last acknowledgement."""

from __future__ import annotations

from aiohttp import web

from drsvc.api.guard import principal
from drsvc.api.sources import iso
from drsvc.api.view import context


async def list_sites(request: web.Request) -> web.Response:
    """Sites that serve a source of the caller's tenants: health, backlog, last acknowledgement."""
    who = principal(request, "viewer", "listing sites")
    ctx = context(request)
    config, now = ctx.view.config, ctx.clock()
    status = await ctx.view.site_status()
    out = []
    for site, cfg in config.sites.items():
        tenants = sorted({sc.tenant for sc in config.sources.values() if site in sc.sites})
        if "*" not in who.tenants and not any(who.sees(t) for t in tenants):
            continue
        s = status.get(site)
        oldest = None if s is None else s.oldest
        out.append(
            {
                "name": site,
                "type": cfg.type,
                "tenants": [t for t in tenants if who.sees(t)],
                "up": None if s is None else s.up,
                "last_error": None if s is None else s.last_error,
                "last_ack": None if s is None else s.last_ack,
                "last_ack_at": iso(None if s is None else s.last_ack),
                "backlog_objects": 0 if s is None else s.backlog_objects,
                "backlog_bytes": 0 if s is None else s.backlog_bytes,
                "backlog_oldest_age_s": None if oldest is None else max(0.0, now - oldest),
            }
        )
    return web.json_response({"sites": out})
