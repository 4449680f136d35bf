"""drsvc status [--json]: each source's live RPO and each site's backlog, while the daemon runs.

Reads ``<state.dir>/outbox.db`` read-only and never takes the state lock (the daemon holds it): the values
are those the daemon persisted, ``last_snapshot:<source>`` and ``protected_until:<source>`` in the outbox's
meta table, and the per-site backlog. Exits EXIT_FAILURE when a source misses its ``rpo_target`` (a source
with a target that was never protected misses it), so cron and monitoring can use the exit code.
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
    return {
        "state": str(config.state.dir),
        "now": now,
        "ok": all(s["rpo_ok"] is not False for s in sources),
        "sources": sources,
        "sites": sites,
    }


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
        if args.json:
            emit_json(
                {"state": None, "note": f"no state yet: {path} does not exist", "sources": [], "sites": []}
            )
        else:
            out(f"no state yet: {path} does not exist (no snapshot or daemon run has used this state dir)")
        return 0
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
