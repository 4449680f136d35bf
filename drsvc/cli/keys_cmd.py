"""drsvc keys TENANT list|add|remove|passwd|shred: the key slots of a tenant repository."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from drsvc.app import App
from drsvc.cli.render import emit_json, err, out
from drsvc.core.config import load_config
from drsvc.core.crypto import ScryptParams
from drsvc.core.errors import ConfigError
from drsvc.keys import KeyManager, generate_keyfile, read_secret_file


def register(sub: Any) -> None:
    p = sub.add_parser("keys", help="manage a tenant's key slots")
    p.add_argument("tenant")
    sp = p.add_subparsers(dest="keys_verb", required=True)
    ls = sp.add_parser("list", help="the key slots and the sites holding them")
    ls.add_argument("--json", action="store_true")
    add = sp.add_parser("add", help="add a slot for another passphrase or key file")
    g = add.add_mutually_exclusive_group(required=True)
    g.add_argument("--passphrase-file", help="first line of this file is the new passphrase ('-': prompt)")
    g.add_argument("--keyfile", help="a key file (at least 32 bytes); with --generate it is created")
    add.add_argument(
        "--generate", action="store_true", help="create the key file with 64 random bytes (0600)"
    )
    rm = sp.add_parser("remove", help="remove a slot (never the last one)")
    rm.add_argument("slot")
    pw = sp.add_parser("passwd", help="replace the configured passphrase's slot by a new passphrase")
    pw.add_argument("--passphrase-file", required=True, help="the new passphrase ('-': prompt)")
    sh = sp.add_parser("shred", help="destroy every key slot on every site: the data becomes unreadable")
    sh.add_argument("--confirm", required=True, help="the tenant's name, typed again")
    for q in (add, pw):
        q.add_argument("--scrypt-n", type=int, default=ScryptParams.n, help=argparse.SUPPRESS)
    p.set_defaults(handler=run)


def _passphrase(path: str) -> bytes:
    if path == "-":
        first = getpass.getpass("new passphrase: ").encode()
        if first != getpass.getpass("again: ").encode():
            raise ConfigError("the two passphrases differ", key="--passphrase-file")
        return first
    return read_secret_file(path, "passphrase")


async def run(args: argparse.Namespace) -> int:
    async with App(load_config(args.config)) as app:
        km = KeyManager(app, args.tenant)
        verb = args.keys_verb
        if verb == "list":
            slots = await km.list()
            if args.json:
                emit_json([s.__dict__ for s in slots])
            else:
                out(f"{'SLOT':32}  {'KIND':10}  {'KDF':24}  SITES")
                for s in slots:
                    mark = "  (the configured key)" if s.opens_configured_key else ""
                    out(f"{s.id:32}  {s.kind:10}  {s.kdf:24}  {','.join(s.sites)}{mark}")
        elif verb == "add":
            if args.keyfile:
                if args.generate:
                    generate_keyfile(args.keyfile)
                sid = await km.add("keyfile", read_secret_file(args.keyfile, "keyfile"))
            else:
                sid = await km.add(
                    "passphrase", _passphrase(args.passphrase_file), ScryptParams(n=args.scrypt_n)
                )
            out(f"added key slot {sid} on {len(km.stores)} sites")
        elif verb == "remove":
            await km.remove(args.slot)
            out(f"removed key slot {args.slot} from {len(km.stores)} sites")
        elif verb == "passwd":
            old, new = await km.passwd(_passphrase(args.passphrase_file), ScryptParams(n=args.scrypt_n))
            out(f"key slot {old} replaced by {new}")
            err("now point tenants.<name>.key.passphrase in the config at the new passphrase")
        else:
            n = await km.shred(args.confirm)
            out(
                f"crypto-shredded tenant {args.tenant}: {n} key slot objects destroyed on "
                f"{len(km.stores)} sites; its data can no longer be decrypted"
            )
    return 0
