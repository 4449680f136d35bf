"""drsvc forget SOURCE [--dry-run]: apply the source's retention policy to its snapshot records.

Forgotten records are deleted at every site of the source that holds them; the data they reference stays
until prune. Exits EXIT_TEMPFAIL when a site could not be reached: its deletions happen on a later run.
"""

from __future__ import annotations

import argparse
from typing import Any

from drsvc.app import App
from drsvc.cli.main import EXIT_TEMPFAIL
from drsvc.cli.render import emit_json, err, out, when
from drsvc.core.config import load_config
from drsvc.core.retention import ForgetOutcome


def register(sub: Any) -> None:
    p = sub.add_parser("forget", help="forget snapshots by the source's retention policy")
    p.add_argument("source")
    p.add_argument("--dry-run", action="store_true", help="show what would be forgotten; delete nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def _as_json(o: ForgetOutcome) -> dict[str, Any]:
    return {
        "source": o.source,
        "dry_run": o.dry_run,
        "keep": [
            {"id": r.id, "time": when(r.time_ns), "partial": r.partial, "reasons": list(why)}
            for r, why in o.plan.keep
        ],
        "forget": [
            {
                "id": r.id,
                "time": when(r.time_ns),
                "partial": r.partial,
                "sites_holding": sorted(o.holders.get(r.id, ())),
                "deleted_at": sorted(o.deleted.get(r.id, ())),
            }
            for r in o.plan.forget
        ],
        "unreachable": o.unreachable,
        "locked": o.locked,
        "segments_forgotten": o.segments_forgotten,
        "wal_forgotten": o.wal_forgotten,
        "segments_locked": o.segments_locked,
        "complete": o.complete,
    }


async def run(args: argparse.Namespace) -> int:
    async with App(load_config(args.config)) as app:
        o = await app.forget(args.source, args.dry_run)
    if args.json:
        emit_json(_as_json(o))
    else:
        verb = "would forget" if o.dry_run else "forgot"
        out(f"{args.source}: keep {len(o.plan.keep)}, {verb} {len(o.plan.forget)} snapshots")
        width = max(5, len(" ".join(f"?{s}" for s in o.sites)))
        out(f"{'':6}  {'ID':16}  {'TIME':25}  {'SITES':{width}}  REASONS")
        rows = [(r, "keep", ", ".join(why)) for r, why in o.plan.keep]
        rows += [(r, "forget", "") for r in o.plan.forget]
        for r, action, why in sorted(rows, key=lambda x: (x[0].time_ns, x[0].id)):
            held = o.holders.get(r.id, set())
            if action == "forget" and not o.dry_run:
                held = held - o.deleted.get(r.id, set())  # what still holds it
            # a site that holds the record now, -site: it does not, ?site: unreachable, not known
            marks = " ".join(s if s in held else f"?{s}" if s in o.unreachable else f"-{s}" for s in o.sites)
            flag = "  PARTIAL" if r.partial else ""
            out(f"{action:6}  {r.id[:16]}  {when(r.time_ns):25}  {marks:{width}}  {why}{flag}".rstrip())
        if o.segments_forgotten:
            verb_s = "would go" if o.dry_run else "deleted"
            n = o.segments_forgotten
            out(f"change-log segments of forgotten checkpoints {verb_s}: {n} (copies, all sites)")
        if o.wal_forgotten:
            verb_w = "would go" if o.dry_run else "deleted"
            out(f"archived WAL before the oldest kept base backup {verb_w}: {o.wal_forgotten} (copies)")
        if o.plan.forget and not o.dry_run:
            out("snapshot records deleted; the data they reference stays until `drsvc prune`")
    for rid, where in sorted(o.locked.items()):
        for site, until in sorted(where.items()):
            err(
                f"note: site {site} keeps snapshot {rid[:16]} under object lock until {until}; "
                "a later forget deletes it there"
            )
    for site, why in sorted(o.unreachable.items()):
        err(
            f"warning: site {site} could not be reached ({why}); "
            + (
                "the plan was made without its listing"
                if o.dry_run
                else "its forgotten records are still there: run `drsvc forget` again when it is back "
                "(the deletion reaches every replica then)"
            )
        )
    return 0 if o.complete else EXIT_TEMPFAIL
