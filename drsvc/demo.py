"""`make run`: the daemon on the embedded default, in the foreground.

It makes a sample tree source and two local-directory sites under ./var, creates the tenant repository,
takes and restores one snapshot to show the whole path, prints what to curl, then runs `drsvc run` (the
HTTP listener on 127.0.0.1:8080) until Ctrl-C. `--once` stops after the snapshot and restore.
"""

from __future__ import annotations

import argparse
import asyncio
import filecmp
import os
import random
import shutil
import sys
from pathlib import Path

import restore
from drsvc.app import App
from drsvc.core.config import load_config
from drsvc.core.crypto import ScryptParams

CONFIG = """\
# Written by `make run` (drsvc.demo). See deploy/drsvc.toml.example for every setting.
[state]
dir = "state"

[tenants.demo.key.passphrase]
file = "demo.passphrase"

[sites.local-a]
type = "local"
path = "sites/local-a"

[sites.local-b]
type = "local"
path = "sites/local-b"

[sources.sample]
tenant = "demo"
type = "tree"
path = "sample"
sites = ["local-a", "local-b"]
min_copies = 2
interval = "5m"
rpo_target = "15m"

[daemon]
listen = "{listen}"
"""


def make_sample(root: Path) -> None:
    rng = random.Random(42)
    words = "province city department archive record ledger permit budget report audit".split()
    for d in range(5):
        sub = root / f"dept-{d}" / "records"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(40):
            text = "\n".join(
                " ".join(rng.choice(words) for _ in range(12)) for _ in range(rng.randint(5, 200))
            )
            (sub / f"record-{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    (root / "db").mkdir(exist_ok=True)
    (root / "db" / "ledger.db").write_bytes(b"".join(rng.randbytes(64) * 128 for _ in range(256)))
    (root / "empty-dir").mkdir(exist_ok=True)
    (root / "README.txt").write_text("Sample tree source for the drsvc demo.\n", encoding="utf-8")
    if not (root / "latest").is_symlink():
        os.symlink("README.txt", root / "latest")


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    return all(same_tree(a / d, b / d) for d in cmp.common_dirs)


async def demo(root: Path, listen: str) -> int:
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / "drsvc.toml"
    if not cfg_path.exists():
        cfg_path.write_text(CONFIG.format(listen=listen), encoding="utf-8")
        (root / "demo.passphrase").write_text("correct horse battery staple\n", encoding="utf-8")
        os.chmod(root / "demo.passphrase", 0o600)
    make_sample(root / "sample")
    config = load_config(cfg_path)
    async with App(config) as app:
        sites = await app.init_tenant("demo", ScryptParams(n=2**14))
        print(f"repository of tenant 'demo' on sites: {', '.join(sites)}")
        o = await app.snapshot("sample")
        s = o.result.stats
        print(
            f"snapshot {o.result.record.id[:16]}: {s.files} files, {s.bytes_total} bytes, "
            f"{s.blobs_new} new blobs; protected on {', '.join(o.protection.holding)} "
            f"({'yes' if o.protection.protected else 'NO'}) in {o.seconds:.2f}s"
        )
        target = root / "restored"
        shutil.rmtree(target, ignore_errors=True)
        r = await app.restore("sample", target, None, site="local-b")
        assert isinstance(r, restore.RestoreResult)  # the sample is a tree source
        print(
            f"restored {r.files} files, {r.bytes} bytes from site {r.site} in {r.seconds:.2f}s, "
            f"every blob verified"
        )
    ok = same_tree(root / "sample", target)
    print(f"restored tree equals the source: {ok}")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", type=Path, default=Path("var"))
    p.add_argument("--listen", default="127.0.0.1:8080")
    p.add_argument("--once", action="store_true", help="snapshot and restore once, do not run the daemon")
    args = p.parse_args()
    root = args.root.resolve()
    rc = asyncio.run(demo(root, args.listen))
    if rc or args.once:
        return rc
    cfg = root / "drsvc.toml"
    listen = load_config(cfg).daemon.listen
    print(
        f"\nStarting the daemon (Ctrl-C stops it after draining). In another terminal:\n"
        f"  curl -s http://{listen}/healthz\n"
        f"  curl -s http://{listen}/readyz\n"
        f"  curl -s http://{listen}/metrics | grep drsvc_\n"
        f"  .venv/bin/drsvc -c {cfg} status\n"
        f"  .venv/bin/drsvc -c {cfg} ls sample\n"
        f"  .venv/bin/drsvc -c {cfg} restore sample --at latest --to {root}/restored-2\n",
        flush=True,
    )
    from drsvc.cli.main import main as cli

    return cli(["-c", str(cfg), "run"])


if __name__ == "__main__":
    sys.exit(main())
