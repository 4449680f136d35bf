"""Builders shared by the end-to-end tests: configs, apps, trees and their comparison."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from drsvc.app import App
from drsvc.core.config import Config, parse_config
from drsvc.core.crypto import ScryptParams

PASSPHRASE = "correct horse battery staple"
FAST_SCRYPT = ScryptParams(n=2**10)


def local_sites(tmp: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"type": "local", "path": str(tmp / "sites" / n)} for n in names}


def make_config(
    tmp: Path,
    source_path: Path,
    sites: dict[str, dict[str, Any]],
    *,
    min_copies: int = 1,
    tenant: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    passphrase: str = PASSPHRASE,
) -> Config:
    return parse_config(
        {
            "state": {"dir": str(tmp / "state")},
            "tenants": {"fin": {"key": {"passphrase": {"value": passphrase}}, **(tenant or {})}},
            "sites": sites,
            "sources": {
                "docs": {
                    "tenant": "fin",
                    "type": "tree",
                    "path": str(source_path),
                    "sites": list(sites),
                    "min_copies": min_copies,
                    **(source or {}),
                }
            },
        }
    )


async def init_app(config: Config, in_process_bytes: int | None = None) -> App:
    """An App with a tenant repository; `in_process_bytes=0` sends every file to the worker processes."""
    app = App(config, workers=2)
    if in_process_bytes is not None:
        app.in_process_bytes = in_process_bytes
    await app.init_tenant("fin", FAST_SCRYPT)
    return app


def tree_state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a restore must reproduce: kind, mode, mtime, content or link target, per path."""
    top = root.stat()
    out: dict[str, tuple[Any, ...]] = {".": ("d", stat.S_IMODE(top.st_mode), top.st_mtime_ns)}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_mtime_ns, p.read_bytes())
    return out


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
