"""drsvc ls SOURCE: the source's restorable range, its snapshots, their sizes and which sites hold them."""

from __future__ import annotations

import argparse
from typing import Any

from drsvc.app import App
from drsvc.cli.render import emit_json, out, size, when
from drsvc.core.config import load_config


def register(sub: Any) -> None:
    p = sub.add_parser("ls", help="list a source's snapshots")
    p.add_argument("source")
    p.add_argument("--site", help="read the listing from this site")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    async with App(config) as app:
        records, holders = await app.snapshots(args.source, args.site)
        span = await app.restorable_range(args.source, args.site)
    sites = config.source(args.source).sites
    if args.json:
        emit_json(
            {
                "restorable": {"earliest": when(span[0]), "latest": when(span[1])} if span else None,
                "snapshots": [
                    {
                        "id": r.id,
                        "time": when(r.time_ns),
                        "files": r.stats.get("files", 0),
                        "bytes": r.stats.get("bytes_total", 0),
                        "stored": r.stats.get("bytes_stored", 0),
                        "partial": r.partial,
                        "sites": sorted(holders.get(r.id, ())),
                    }
                    for r in records
                ],
            }
        )
        return 0
    if span:
        out(f"restorable range: {when(span[0])} .. {when(span[1])}")
    if config.source(args.source).type == "log":
        out("snapshots of a log source are its checkpoints; change-log segments fill the time between them")
    out(f"{'ID':16}  {'TIME':25}  {'FILES':>7}  {'SIZE':>10}  {'ADDED':>10}  SITES")
    for r in records:
        held = holders.get(r.id, set())
        marks = " ".join(s if s in held else f"-{s}" for s in sites)
        out(
            f"{r.id[:16]}  {when(r.time_ns):25}  {r.stats.get('files', 0):>7}  "
            f"{size(r.stats.get('bytes_total', 0)):>10}  {size(r.stats.get('bytes_stored', 0)):>10}  {marks}"
            f"{'  PARTIAL' if r.partial else ''}"
        )
    return 0
