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


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from drsvc.cli import (
        audit_cmd,
        check_cmd,
        config_cmd,
        drill_cmd,
        forget_cmd,
        init_cmd,
        keys_cmd,
        ls_cmd,
        prune_cmd,
        restore_cmd,
        run_cmd,
        scrub_cmd,
        snapshot_cmd,
        status_cmd,
        token_cmd,
        wal_cmd,
    )

    p = argparse.ArgumentParser(prog="drsvc", description="Cross-site disaster-recovery replication")
    p.add_argument(
        "-c",
        "--config",
        default=os.environ.get("DRSVC_CONFIG", "/etc/drsvc/drsvc.toml"),
        help="config file (default: $DRSVC_CONFIG or /etc/drsvc/drsvc.toml)",
    )
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs = (
        init_cmd,
        snapshot_cmd,
        ls_cmd,
        restore_cmd,
        forget_cmd,
        check_cmd,
        prune_cmd,
        scrub_cmd,
        status_cmd,
        run_cmd,
        keys_cmd,
        config_cmd,
        wal_cmd,
        token_cmd,
        drill_cmd,
        audit_cmd,
    )
    for mod in verbs:
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from drsvc.cli import wal_fast

    fast = wal_fast.dispatch(sys.argv[1:] if argv is None else argv)
    if fast is not None:  # archive_command, or restore_command served from the prefetch cache
        return fast
    import asyncio

    from drsvc.memory import tune_allocator

    args = build_parser().parse_args(argv)
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
