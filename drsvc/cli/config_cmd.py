"""drsvc config check [FILE]: validate a config file; errors name the key."""

from __future__ import annotations

import argparse
from typing import Any

from drsvc.cli.render import err, out
from drsvc.core.config import load_config


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="configuration tools")
    sp = p.add_subparsers(dest="config_verb", required=True)
    c = sp.add_parser("check", help="validate a config file")
    c.add_argument("file", nargs="?")
    c.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.file or args.config)
    for key in cfg.inline_secrets():
        err(f"warning: {key} is written inline; use file = ... or env = ... outside tests and demos")
    out(f"config ok: {len(cfg.tenants)} tenants, {len(cfg.sites)} sites, {len(cfg.sources)} sources")
    return 0
