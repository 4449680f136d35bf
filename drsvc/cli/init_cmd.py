"""drsvc init TENANT: create the tenant's repository, with a key slot, on every site its sources use."""

from __future__ import annotations

import argparse
from typing import Any

from drsvc.app import App
from drsvc.cli.render import out
from drsvc.core.config import load_config
from drsvc.core.crypto import ScryptParams


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="create a tenant repository on its sites")
    p.add_argument("tenant")
    p.add_argument("--scrypt-n", type=int, default=ScryptParams.n, help=argparse.SUPPRESS)
    p.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    async with App(load_config(args.config)) as app:
        sites = await app.init_tenant(args.tenant, ScryptParams(n=args.scrypt_n))
    out(f"repository for tenant {args.tenant} ready on {len(sites)} sites: {', '.join(sites)}")
    return 0
