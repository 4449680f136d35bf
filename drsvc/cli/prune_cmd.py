"""drsvc prune [--tenant T] [--dry-run] [--grace D] [--repack-waste X] [--json]: delete unreferenced data.

Runs one prune pass per tenant (drsvc/prune.py): condemn what no snapshot needs, delete what was condemned at
least the grace period ago, at every site. `--grace 0` deletes at once and is only for a repository nobody
writes to meanwhile. Exits EXIT_TEMPFAIL when a site could not be listed (nothing is deleted then).
"""

from __future__ import annotations

import argparse
from typing import Any

from drsvc.app import App
from drsvc.cli.render import emit_json, err, out, size, when
from drsvc.core.config import load_config, parse_duration
from drsvc.core.errors import ConfigError
from drsvc.prune import PruneReport, prune_tenant


def register(sub: Any) -> None:
    p = sub.add_parser("prune", help="delete data that no snapshot references, at every site")
    p.add_argument("--tenant", action="append", help="only this tenant (repeatable; default: every tenant)")
    p.add_argument("--dry-run", action="store_true", help="show what would be condemned, repacked, deleted")
    p.add_argument(
        "--grace",
        help="how long a condemned pack waits before deletion (default: [prune] grace); "
        "0 deletes at once: only when nothing writes to the repository meanwhile",
    )
    p.add_argument("--repack-waste", type=float, help="repack packs with more than this unused share (0..1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def _print(r: PruneReport) -> None:
    verb = "would" if r.dry_run else "did"
    out(
        f"tenant {r.tenant}: {r.snapshots} snapshots, {r.packs} packs ({size(r.pack_bytes)}), "
        f"{size(r.used_bytes)} referenced"
    )
    out(
        f"  condemned  {len(r.condemned):6} packs  {size(r.condemned_bytes):>10}  ({r.unindexed} in no index)"
    )
    out(f"  repacked   {len(r.repacked):6} packs  {r.repack_blobs} blobs into {size(r.repack_bytes)}")
    out(
        f"  deleted    {len(r.deleted):6} packs  {size(r.deleted_bytes):>10}  "
        f"({r.deleted_objects} objects across {len(r.sites)} sites)"
        + (f", {verb} not delete: dry run" if r.dry_run else "")
    )
    if r.resurrected:
        out(f"  taken back {len(r.resurrected):6} packs  (snapshots written since need them)")
    if r.waiting:
        nxt = f", next deletion after {when(r.next_sweep_ns)}" if r.next_sweep_ns else ""
        out(f"  waiting    {r.waiting:6} packs  condemned, deleted after the grace period{nxt}")
    for x in r.locked:
        err(f"warning: site {x.site}: {x.key} is locked until {x.until or 'an unknown date'}; deleted later")
    for note in r.notes:
        err(f"note: {note}")
    out(f"  in {r.seconds:.1f} s")


async def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    grace = None
    if args.grace is not None:
        try:
            grace = parse_duration(args.grace.strip())
        except ValueError as exc:
            raise ConfigError(f"--grace: {exc}", key="--grace") from None
    if args.repack_waste is not None and not 0 <= args.repack_waste <= 1:
        raise ConfigError("--repack-waste must be between 0 and 1", key="--repack-waste")
    tenants = args.tenant or list(config.tenants)
    for t in tenants:
        if t not in config.tenants:
            raise ConfigError(f"no tenant {t!r}; configured: {', '.join(config.tenants)}", key="--tenant")
    reports = []
    async with App(config) as app:
        for t in tenants:
            if not config.tenant_sites(t):
                continue  # no source uses the tenant: it has no sites
            r = await prune_tenant(app, t, grace=grace, repack_waste=args.repack_waste, dry_run=args.dry_run)
            reports.append(r)
            if not args.json:
                _print(r)
    if args.json:
        emit_json([r.as_dict() for r in reports])
    return 0
