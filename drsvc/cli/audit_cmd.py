"""drsvc audit verify [--site NAME] [--json] | show [--since TIME] [--json]: the API's audit log.

`verify` checks the local files (chain, order, head and expiry anchors), then compares them with the sealed
copies at the sites of the audit tenant (all of them, or those named). Exit codes: 0 intact (warnings such
as a line cut by a crash or records not yet replicated are printed), 3 (EXIT_INTEGRITY) when a record was
modified, removed or reordered, or a site lacks what was shipped there; 75 (EXIT_TEMPFAIL) when intact
locally but a site could not be read. `show` prints the records, oldest first.
"""

from __future__ import annotations

import argparse
from typing import Any

from drsvc.app import App
from drsvc.audit import AuditVerdict, Issue, open_log, verify_with_sites
from drsvc.cli.main import EXIT_INTEGRITY, EXIT_OK, EXIT_TEMPFAIL
from drsvc.cli.render import emit_json, out
from drsvc.core.config import load_config, parse_point
from drsvc.core.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser("audit", help="verify or show the API's audit log")
    verbs = p.add_subparsers(dest="audit_verb", required=True, metavar="ACTION")
    v = verbs.add_parser("verify", help="check the chain, the anchors and the sites' sealed copies")
    v.add_argument("--site", action="append", help="compare with this site only (repeatable; default: all)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(handler=verify)
    s = verbs.add_parser("show", help="print the records, oldest first")
    s.add_argument("--since", type=_time, help="ISO 8601 time (local if no zone) or @epoch-seconds")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=show)


def _time(text: str) -> int:
    try:
        t = parse_point(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if t is None:
        raise argparse.ArgumentTypeError("give a time, not 'latest'")
    return t


def exit_code(v: AuditVerdict) -> int:
    if v.problems:
        return EXIT_INTEGRITY
    if any(w.kind is Issue.UNREACHABLE for w in v.warnings):
        return EXIT_TEMPFAIL
    return EXIT_OK


async def verify(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    for site in args.site or ():
        if site not in config.sites:
            raise ConfigError(f"no site {site!r}; configured: {', '.join(config.sites)}", key="sites")
    log = open_log(config)
    async with App(config) as app:
        verdict = await verify_with_sites(app, log, args.site)
    if args.json:
        emit_json(verdict.to_json())
    else:
        render(verdict)
    return exit_code(verdict)


def render(v: AuditVerdict) -> None:
    state = "intact" if v.intact else f"NOT INTACT: {len(v.problems)} problems"
    span = f"seq {v.first_seq}..{v.last_seq}" if v.records else "no records"
    sites = ", ".join(f"{s} up to seq {n}" for s, n in v.sites.items())
    out(f"audit log {v.directory}: {state}: {v.records} records ({span}) in {v.files} files")
    if v.replicated:
        out(f"  sites: {sites or 'none readable'}")
    for f in v.findings:
        where = f.where()
        label = "warning" if f.warning else "PROBLEM"
        out(f"  {label} {f.kind.value}" + (f" at {where}" if where else "") + f": {f.detail}")


async def show(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    log = open_log(config)
    records = list(log.records(args.since or 0))
    if args.json:
        emit_json([r.to_json() for r in records])
        return EXIT_OK
    for r in records:
        extra = " ".join(
            f"{k}={v}" for k, v in (("tenant", r.tenant), ("from", r.remote), ("id", r.request_id)) if v
        )
        target = ",".join(f"{k}={v}" for k, v in sorted(r.target.items()))
        out(f"{r.seq:>8} {r.time} {r.who} {r.action} [{target}] -> {r.status} {r.result} {extra}".rstrip())
    return EXIT_OK
