"""drsvc check TENANT [--read-data] [--site NAME]: verify each site's copy of a tenant repository.

One line per site: snapshots, packs, blobs and evidence (audit batches and drill reports, each authenticated
with --read-data), then its problems; ``--json`` prints every ``SiteCheck`` field (``evidence`` included)."""

from __future__ import annotations

import argparse
from typing import Any

from drsvc.app import App
from drsvc.check import check_site
from drsvc.cli.main import EXIT_INTEGRITY
from drsvc.cli.render import emit_json, out, size
from drsvc.core.config import load_config


def register(sub: Any) -> None:
    p = sub.add_parser("check", help="check a tenant repository at each site")
    p.add_argument("tenant")
    p.add_argument("--read-data", action="store_true", help="download and verify every pack")
    p.add_argument("--site", action="append", help="check only this site (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def lock_text(period: float | None) -> str:
    if period is None:
        return "no object lock (objects can be deleted by anyone with access to the site)"
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if period >= seconds and period % seconds == 0:
            return f"object lock COMPLIANCE {period // seconds:.0f}{unit}"
    return f"object lock COMPLIANCE {period:g}s"


async def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    async with App(config) as app:
        sites = args.site or config.tenant_sites(args.tenant)
        repo = await app.open_repo(args.tenant, sites[0])
        results = [await check_site(repo, app.store(s), args.read_data) for s in sites]
        locks = {s: app.store(s).lock_period for s in sites}
    if args.json:
        emit_json([{**r.__dict__, "lock_period": locks[r.site]} for r in results])
    else:
        for r in results:
            state = "ok" if r.ok else f"{len(r.problems)} PROBLEMS"
            out(
                f"site {r.site}: {state}: {r.snapshots} snapshots, {r.packs} packs, {r.blobs} blobs, "
                f"{r.evidence} evidence objects (audit, drill)"
                + (f", {size(r.bytes_read)} read and verified" if args.read_data else "")
            )
            for p in r.problems[:200]:
                out(f"  {p}")
        for s in sites:
            out(f"site {s}: {lock_text(locks[s])}")
    return 0 if all(r.ok for r in results) else EXIT_INTEGRITY
