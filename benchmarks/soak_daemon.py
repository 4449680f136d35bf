"""Soak: the daemon kill -9 test with many more rounds and a new seed each time.

    python -m benchmarks.soak_daemon [--rounds 200] [--seeds 5]

Runs tests/test_daemon_crash.py (three real SeaweedFS sites) with DRSVC_DAEMON_KILL_ROUNDS and
DRSVC_CRASH_SEED set; stops at the first failing seed and prints it, so the failure can be replayed.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    for _ in range(args.seeds):
        seed = random.randrange(1 << 30)
        env = {**os.environ, "DRSVC_DAEMON_KILL_ROUNDS": str(args.rounds), "DRSVC_CRASH_SEED": str(seed)}
        print(f"seed {seed}: {args.rounds} rounds", flush=True)
        rc = subprocess.call(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_daemon_crash.py"],
            env=env,
        )
        if rc:
            print(f"FAILED with DRSVC_CRASH_SEED={seed} DRSVC_DAEMON_KILL_ROUNDS={args.rounds}")
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
