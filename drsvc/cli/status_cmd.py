"""drsvc status [--json]: each source's live RPO, each site's backlog and each tenant's last scrub.

Reads ``<state.dir>/outbox.db`` read-only and never takes the state lock (the daemon holds it): the values
are those the daemon persisted, ``last_snapshot:<source>`` and ``protected_until:<source>`` in the outbox's
meta table, and the per-site backlog. The last scrub of each tenant comes from ``<state.dir>/scrub/``
(written by ``drsvc scrub`` and the daemon). Exits EXIT_FAILURE when a source misses its ``rpo_target`` (a
source with a target that was never protected misses it) or a tenant's last scrub found an object that no
site holds intact, so cron and monitoring can use the exit code.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from typing import Any

from drsvc.cli.main import EXIT_FAILURE
from drsvc.cli.render import emit_json, out, size, when
from drsvc.core.config import Config, load_config
from drsvc.core.errors import DRError
from drsvc.core.outbox import Outbox
from drsvc.scrub import load_state


def register(sub: Any) -> None:
    p = sub.add_parser(
        "status", help="show each source's RPO and each site's backlog (daemon running or not)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def collect(config: Config, outbox: Outbox, now: float) -> dict[str, Any]:
    """The status as plain data: the --json output."""
    sources = []
    for name, sc in config.sources.items():
        last = float(outbox.get_meta(f"last_snapshot:{name}") or 0) or None
        until = float(outbox.get_meta(f"protected_until:{name}") or 0) or None
        rpo = max(0.0, now - until) if until is not None else None
        target = sc.rpo_target
        sources.append(
            {
                "source": name,
                "tenant": sc.tenant,
                "last_snapshot": last,
                "last_snapshot_age": None if last is None else max(0.0, now - last),
                "protected_until": until,
                "rpo": rpo,
                "rpo_target": target,
                "rpo_ok": None if target is None else (rpo is not None and rpo <= target),
            }
        )
    sites = []
    for site in config.sites:
        b = outbox.backlog(site)
        sites.append(
            {
                "site": site,
                "backlog_objects": b.objects,
                "backlog_bytes": b.bytes,
                "oldest_age": None if b.oldest is None else max(0.0, now - b.oldest),
                "last_error": b.last_error,
            }
        )
    scrubs = scrub_status(config, now)
    return {
        "state": str(config.state.dir),
        "now": now,
        "ok": all(s["rpo_ok"] is not False for s in sources) and not any(s["unrecoverable"] for s in scrubs),
        "sources": sources,
        "sites": sites,
        "scrub": scrubs,
    }


def scrub_status(config: Config, now: float) -> list[dict[str, Any]]:
    """Each tenant's last scrub: when, what it found and repaired, and what no site holds intact."""
    out: list[dict[str, Any]] = []
    for tenant in config.tenants:
        last = load_state(config.state.dir, tenant).last
        if last is None:
            out.append({"tenant": tenant, "finished": None, "age": None, "unrecoverable": 0})
            continue
        out.append(
            {
                "tenant": tenant,
                "finished": last.finished,
                "age": max(0.0, now - last.finished),
                "read_share": last.read_share,
                "findings": len(last.damage),
                "notices": len(last.findings) - len(last.damage),
                "repaired": last.repairs,
                "unrepaired": len(last.unrepaired),
                "unreachable": sorted(last.unreachable),
                "unrecoverable": len(last.unrecoverable),
                "lost": [
                    {
                        "object": u.object,
                        "breaks": [{"id": b.id, "source": b.source, "time_ns": b.time_ns} for b in u.breaks],
                    }
                    for u in last.unrecoverable
                ],
            }
        )
    return out


def age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


async def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    path = config.state.dir / "outbox.db"
    if not path.exists():
        scrubs = scrub_status(config, time.time())
        ok = not any(s["unrecoverable"] for s in scrubs)
        note = f"no state yet: {path} does not exist"
        if args.json:
            emit_json({"state": None, "note": note, "ok": ok, "sources": [], "sites": [], "scrub": scrubs})
        else:
            out(f"{note} (no snapshot or daemon run has used this state dir)")
            if any(s["finished"] is not None for s in scrubs):
                out()
                render_scrub(scrubs)
        return 0 if ok else EXIT_FAILURE
    try:
        outbox = Outbox.open_readonly(path)
        try:
            status = collect(config, outbox, time.time())
        finally:
            outbox.close()
    except sqlite3.Error as exc:
        raise DRError(
            f"cannot read the state database: {exc}",
            path=str(path),
            hint="check that this user may read the state dir (the daemon's user or root)",
        ) from None
    if args.json:
        emit_json(status)
    else:
        render(status)
    return 0 if status["ok"] else EXIT_FAILURE


def render(status: dict[str, Any]) -> None:
    out(f"{'SOURCE':16}  {'TENANT':12}  {'SNAPSHOT AGE':>12}  {'PROTECTED UNTIL':25}  {'RPO':>9}  TARGET")
    for s in status["sources"]:
        until = "never" if s["protected_until"] is None else when(int(s["protected_until"] * 1e9))
        target = "-"
        if s["rpo_target"] is not None:
            target = f"{age(s['rpo_target'])} {'OK' if s['rpo_ok'] else 'MISSED'}"
        out(
            f"{s['source']:16}  {s['tenant']:12}  {age(s['last_snapshot_age']):>12}  {until:25}  "
            f"{age(s['rpo']):>9}  {target}"
        )
    out()
    out(f"{'SITE':16}  {'BACKLOG':>8}  {'BYTES':>10}  {'OLDEST':>9}  LAST ERROR")
    for b in status["sites"]:
        oldest = "-" if b["oldest_age"] is None else age(b["oldest_age"])
        out(
            f"{b['site']:16}  {b['backlog_objects']:>8}  {size(b['backlog_bytes']):>10}  {oldest:>9}  "
            f"{b['last_error'] or '-'}"
        )
    out()
    render_scrub(status["scrub"])


def render_scrub(scrubs: list[dict[str, Any]]) -> None:
    out(f"{'TENANT':12}  {'LAST SCRUB':>10}  {'FINDINGS':>8}  {'REPAIRED':>8}  {'LOST':>6}  UNREACHABLE")
    for s in scrubs:
        if s["finished"] is None:
            out(f"{s['tenant']:12}  {'never':>10}")
            continue
        out(
            f"{s['tenant']:12}  {age(s['age']):>10}  {s['findings']:>8}  {s['repaired']:>8}  "
            f"{s['unrecoverable']:>6}  {', '.join(s['unreachable']) or '-'}"
        )
        for lost in s["lost"]:
            broken = ", ".join(
                f"{b['source']} {when(b['time_ns']) if b['time_ns'] else b['id'][:16]}"
                for b in lost["breaks"]
            )
            out(f"  intact at no site: {lost['object']}" + (f"; breaks {broken}" if broken else ""))
