"""drsvc scrub [--tenant T] [--read-share X] [--no-repair] [--json]: find and repair damaged copies.

Exit codes: 0 clean, or every finding repaired; 3 (EXIT_INTEGRITY) when an object is intact at no site, or
with --no-repair when something is damaged; 75 (EXIT_TEMPFAIL) when a site could not be reached or a repair
could not be written (run it again later). Extra and stray objects are reported but change no exit code.
Findings (and, with --log-level info, repairs) are also logged as JSON lines on stderr, as the daemon does.
"""

from __future__ import annotations

import argparse
from typing import Any

from drsvc import logs
from drsvc.app import App
from drsvc.cli.main import EXIT_INTEGRITY, EXIT_OK, EXIT_TEMPFAIL
from drsvc.cli.render import emit_json, out, size, when
from drsvc.core.config import load_config
from drsvc.core.errors import ConfigError
from drsvc.scrub import ScrubReport, scrub_tenant

MAX_LINES = 200


def register(sub: Any) -> None:
    p = sub.add_parser("scrub", help="verify every site's copy of tenant repositories and repair them")
    p.add_argument("--tenant", action="append", help="scrub only this tenant (repeatable; default: all)")
    p.add_argument(
        "--read-share",
        type=_share,
        help="share of the packs and indexes to download and verify, 0 < x <= 1 (default: [scrub] "
        "read_share); successive runs read the others",
    )
    p.add_argument("--no-repair", action="store_true", help="report only; write nothing to any site")
    p.add_argument("--json", action="store_true")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    p.set_defaults(handler=run)


def _share(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]: {text}")
    return x


def exit_code(report: ScrubReport) -> int:
    if report.unrecoverable or (not report.repair and report.damage):
        return EXIT_INTEGRITY
    if report.unreachable or report.unrepaired:
        return EXIT_TEMPFAIL
    return EXIT_OK


async def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    config = load_config(args.config)
    tenants = args.tenant or list(config.tenants)
    for t in tenants:
        if t not in config.tenants:
            raise ConfigError(f"no tenant {t!r}; configured: {', '.join(config.tenants)}", key="tenants")
    share = args.read_share if args.read_share is not None else config.scrub.read_share
    reports = []
    async with App(config) as app:
        for t in tenants:
            if config.tenant_sites(t):
                reports.append(await scrub_tenant(app, t, share, repair=not args.no_repair))
    if args.json:
        emit_json([r.to_json() for r in reports])
    else:
        for r in reports:
            render(r)
    codes = {exit_code(r) for r in reports}
    return EXIT_INTEGRITY if EXIT_INTEGRITY in codes else max(codes, default=EXIT_OK)


def render(r: ScrubReport) -> None:
    state = "clean" if r.clean else f"{len(r.damage)} damaged, {r.repairs} repaired"
    if r.unrecoverable:
        state += f", {len(r.unrecoverable)} UNRECOVERABLE"
    out(
        f"tenant {r.tenant}: {state}: {r.objects} objects, {r.copies} copies at {len(r.sites)} sites, "
        f"{r.copies_read} copies ({size(r.bytes_verified)}) read and verified"
        + (f", {r.in_flight} copies still on their way" if r.in_flight else "")
    )
    for f in r.findings[:MAX_LINES]:
        status = ""
        if f.damage:
            status = "repaired" if f.repaired else f"NOT REPAIRED ({f.repair_error or 'no intact copy'})"
            if not r.repair:
                status = "not repaired (--no-repair)"
        detail = f": {f.detail}" if f.detail else ""
        out(f"  {f.site}: {f.kind.value} {f.object}{detail}" + (f" -> {status}" if status else ""))
    if len(r.findings) > MAX_LINES:
        out(f"  ... and {len(r.findings) - MAX_LINES} more (--json lists them all)")
    for u in r.unrecoverable:
        held = f"bad copies at {', '.join(u.sites)}" if u.sites else "no copy anywhere"
        out(f"  UNRECOVERABLE {u.object} ({held}): {u.detail}")
        for b in u.breaks[:MAX_LINES]:
            at = when(b.time_ns) if b.time_ns else "time unknown"
            out(f"    breaks snapshot {b.id[:16]} of {b.source} at {at}")
