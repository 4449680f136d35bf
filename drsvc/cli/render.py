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


def parse_time(text: str) -> int | None:
    """'latest' -> None; ISO 8601 (local time if no zone) or @epoch-seconds -> UTC nanoseconds."""
    if text == "latest":
        return None
    if text.startswith("@"):
        return int(float(text[1:]) * 1e9)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use 'latest', ISO 8601 like 2026-11-25T08:00:00+08:00, or @epoch-seconds)"
        ) from None
    if t.tzinfo is None:
        t = t.astimezone()
    return int(t.timestamp() * 1e9)


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


def out(line: str = "") -> None:
    print(line, flush=True)


def err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
