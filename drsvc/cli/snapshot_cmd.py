"""drsvc snapshot SOURCE: take a snapshot, ship it to the source's sites, say whether it is protected."""

from __future__ import annotations

import argparse
from typing import Any

from drsvc.app import App
from drsvc.cli.render import emit_json, err, out, size, when
from drsvc.core.config import load_config
from replicator import require_protected


def register(sub: Any) -> None:
    p = sub.add_parser("snapshot", help="snapshot a source now and ship it")
    p.add_argument("source")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--in-process-bytes", type=int, default=None, help=argparse.SUPPRESS)  # tests, benchmarks
    p.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    async with App(load_config(args.config)) as app:
        if args.in_process_bytes is not None:
            app.in_process_bytes = args.in_process_bytes
        o = await app.snapshot(args.source)
    r, s, p = o.result, o.result.stats, o.protection
    if args.json:
        emit_json(
            {
                "snapshot": r.record.id,
                "source": args.source,
                "time": when(r.record.time_ns),
                "partial": r.record.partial,
                "stats": s.as_dict(),
                "warnings": r.warnings,
                "protected": p.protected,
                "sites_holding": p.holding,
                "sites_lacking": p.lacking,
                "seconds": round(o.seconds, 3),
                "sites": {
                    x.site: {"shipped": x.shipped, "bytes": x.bytes, "error": x.error} for x in o.reports
                },
            }
        )
    else:
        for w in r.warnings:
            err(f"warning: {w}")
        out(
            f"snapshot {r.record.id[:16]} of {args.source} at {when(r.record.time_ns)}"
            f"{' (PARTIAL: see warnings)' if r.record.partial else ''}"
        )
        out(
            f"  {s.files} files, {s.dirs} dirs, {size(s.bytes_total)}; read {s.files_read} files "
            f"({size(s.bytes_read)}), {s.files_unchanged} unchanged"
        )
        out(f"  stored {s.blobs_new} new blobs, {size(s.bytes_stored)} in packs; took {o.seconds:.2f}s")
        for x in o.reports:
            out(
                f"  site {x.site}: {x.shipped} objects, {size(x.bytes)}"
                + (f"; ERROR: {x.error}" if x.error else "")
            )
        out(
            f"  protected: {'yes' if p.protected else 'NO'} ({len(p.holding)} of min {p.min_copies} sites: "
            f"{', '.join(p.holding) or 'none'})"
        )
    require_protected(p, o.reports, args.source)
    return 0
