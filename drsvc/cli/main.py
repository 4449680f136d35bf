"""The `drsvc` command: one module per verb, exceptions mapped to exit codes scripts can tell apart."""

from __future__ import annotations

import os
import sys

from drsvc.core.errors import (
    ConfigError,
    CryptoError,
    DRError,
    IntegrityError,
    ReplicationError,
    RestoreError,
    TransientStoreError,
)

# argparse, asyncio, typing and the verbs are imported only past wal_fast.dispatch: `drsvc wal-push` runs
# once per WAL segment and starts in a tenth of the time without them (mypy takes any name TYPE_CHECKING for
# true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Coroutine
    from typing import Any

    Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # bad arguments or config
EXIT_INTEGRITY = 3  # check found problems, or data failed verification
EXIT_NOT_PROTECTED = 4  # fewer than min_copies sites hold the result
EXIT_KEY = 5  # wrong passphrase or key file
EXIT_DRILL_FAILED = 6  # a drill missed a target or a scenario failed (the report names each)
EXIT_TEMPFAIL = 75  # a site is unreachable: try again later (sysexits EX_TEMPFAIL)


def exit_code(exc: DRError) -> int:
    for kind, code in (
        (ConfigError, EXIT_USAGE),
        (CryptoError, EXIT_KEY),
        (IntegrityError, EXIT_INTEGRITY),
        (ReplicationError, EXIT_NOT_PROTECTED),
        (TransientStoreError, EXIT_TEMPFAIL),
        (RestoreError, EXIT_FAILURE),
    ):
        if isinstance(exc, kind):
            return code
    return EXIT_FAILURE


# verb -> the module that registers it, in the order `drsvc --help` lists them. Only the module of the verb
# being run is imported: the others (aiohttp for `run`, rich, the drill and audit machinery, ...) cost a short
# command such as `drsvc snapshot` a good part of its start-up. Help and unknown verbs load them all.
VERB_MODULES = {
    "init": "init_cmd",
    "snapshot": "snapshot_cmd",
    "ls": "ls_cmd",
    "restore": "restore_cmd",
    "forget": "forget_cmd",
    "check": "check_cmd",
    "prune": "prune_cmd",
    "scrub": "scrub_cmd",
    "status": "status_cmd",
    "run": "run_cmd",
    "keys": "keys_cmd",
    "config": "config_cmd",
    "wal-push": "wal_cmd",
    "wal-fetch": "wal_cmd",
    "wal-prefetch": "wal_cmd",
    "token": "token_cmd",
    "drill": "drill_cmd",
    "audit": "audit_cmd",
}


def verb_of(argv: list[str]) -> str | None:
    """The verb of a command line: the first argument past the global options (-c/--config FILE), or None
    (no verb, or help asked for before it)."""
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("-c", "--config"):
            if rest:
                rest.pop(0)
        elif arg.startswith("--config=") or (arg.startswith("-c") and not arg.startswith("--")):
            continue
        elif arg.startswith("-"):
            return None
        else:
            return arg
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the verb of `argv` registered (every verb when `argv` is None or names none)."""
    import argparse
    import importlib

    p = argparse.ArgumentParser(prog="drsvc", description="Cross-site disaster-recovery replication")
    p.add_argument(
        "-c",
        "--config",
        default=os.environ.get("DRSVC_CONFIG", "/etc/drsvc/drsvc.toml"),
        help="config file (default: $DRSVC_CONFIG or /etc/drsvc/drsvc.toml)",
    )
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    verb = verb_of(argv) if argv is not None else None
    names = [VERB_MODULES[verb]] if verb in VERB_MODULES else list(dict.fromkeys(VERB_MODULES.values()))
    for name in names:
        importlib.import_module(f"drsvc.cli.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from drsvc.cli import wal_fast

    fast = wal_fast.dispatch(sys.argv[1:] if argv is None else argv)
    if fast is not None:  # archive_command, or restore_command served from the prefetch cache
        return fast
    import asyncio

    from drsvc.memory import tune_allocator

    args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    tune_allocator()
    handler: Handler = args.handler
    try:
        return asyncio.run(handler(args))
    except DRError as exc:
        print(f"drsvc {args.verb}: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # an environment problem no layer mapped: one line, the path, the reason
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"drsvc {args.verb}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
