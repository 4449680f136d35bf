"""Formatting for terminals and scripts: sizes, times, JSON."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).astimezone().isoformat(timespec="seconds")


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


def out(line: str = "") -> None:
    print(line, flush=True)


def err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
