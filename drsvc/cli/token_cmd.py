"""drsvc token new NAME --role ROLE (--tenant T ... | --all-tenants): a new API bearer token and its entry.

A token's scope is always explicit: ``--tenant T`` (repeatable) or ``--all-tenants`` (``tenants = ["*"]``),
one of the two is required.

The token (``secrets.token_urlsafe(32)``, 256 random bits) is printed once and stored nowhere; what goes into
the config (``[api.tokens.NAME]``) or the tokens file (``[tokens.NAME]``, with ``--tokens-file``) is its
SHA-256 hash, its role and its tenants. The daemon reads a tokens file again on SIGHUP.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
from typing import Any

from drsvc.cli.render import emit_json, err, out
from drsvc.core.config import ROLES
from drsvc.core.errors import ConfigError

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def register(sub: Any) -> None:
    p = sub.add_parser("token", help="make API bearer tokens")
    sp = p.add_subparsers(dest="token_verb", required=True)
    new = sp.add_parser("new", help="print a new token once, and the hashed entry for the config")
    new.add_argument("name", help="who uses the token: the name the audit log records")
    new.add_argument("--role", required=True, choices=ROLES)
    scope = new.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--tenant",
        action="append",
        dest="tenants",
        metavar="TENANT",
        help="a tenant the token may see and act on (repeat for more)",
    )
    scope.add_argument(
        "--all-tenants",
        action="store_true",
        help='every tenant, present and future (tenants = ["*"])',
    )
    new.add_argument(
        "--tokens-file", action="store_true", help="print a [tokens.NAME] table for api.tokens_file"
    )
    new.add_argument("--json", action="store_true", help="token and entry as one JSON object")
    p.set_defaults(handler=run)


def new_token() -> tuple[str, str]:
    """A random token and its stored form ("sha256:" + hex digest)."""
    from drsvc.api.auth import hash_token

    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def toml_entry(name: str, digest: str, role: str, tenants: list[str], *, tokens_file: bool) -> str:
    table = f"tokens.{name}" if tokens_file else f"api.tokens.{name}"
    return (
        f"[{table}]\n"
        f"hash = {json.dumps(digest)}\n"
        f"role = {json.dumps(role)}\n"
        f"tenants = [{', '.join(json.dumps(t) for t in tenants)}]\n"
    )


async def run(args: argparse.Namespace) -> int:
    name: str = args.name
    if not _NAME.match(name):
        raise ConfigError(
            f"token name {name!r} must be lowercase letters, digits, '.', '_' or '-' (at most 63)", key="NAME"
        )
    tenants: list[str] = ["*"] if args.all_tenants else list(dict.fromkeys(args.tenants))
    for t in tenants:
        if t != "*" and not _NAME.match(t):
            raise ConfigError(f"not a tenant name: {t!r}", key="--tenant")
    token, digest = new_token()
    entry = toml_entry(name, digest, args.role, tenants, tokens_file=args.tokens_file)
    if args.json:
        emit_json({"name": name, "token": token, "hash": digest, "role": args.role, "tenants": tenants})
        return 0
    err("the token is shown this once; drsvc keeps only its hash:")
    out(token)
    out()
    err("add this to " + ("the tokens file (then SIGHUP the daemon):" if args.tokens_file else "the config:"))
    out(entry.rstrip("\n"))
    return 0
