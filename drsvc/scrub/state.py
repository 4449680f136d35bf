"""A tenant's scrub state under the state dir: the read cursor of the rotation and the last report."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from drsvc.core.durable import write_file
from drsvc.scrub.report import ScrubReport


@dataclass
class ScrubState:
    cursor: float = 0.0  # where the next run's window of indexes, packs, segments and WAL starts, in [0, 1)
    last: ScrubReport | None = None


def state_path(state_dir: Path, tenant: str) -> Path:
    return state_dir / "scrub" / f"{tenant}.json"


def load_state(state_dir: Path, tenant: str) -> ScrubState:
    """The tenant's scrub state; a missing or unreadable file is a fresh start."""
    try:
        d = json.loads(state_path(state_dir, tenant).read_text())
        last = d.get("last")
        return ScrubState(float(d.get("cursor", 0.0)) % 1.0, ScrubReport.from_json(last) if last else None)
    except (OSError, ValueError, TypeError, KeyError):
        return ScrubState()


def save_state(state_dir: Path, tenant: str, state: ScrubState) -> None:
    body = {"cursor": state.cursor, "last": state.last.to_json() if state.last else None}
    write_file(state_path(state_dir, tenant), json.dumps(body, indent=1).encode(), mode=0o644)


def scrub_due(state_dir: Path, tenant: str, interval: float, now: float) -> bool:
    """True when the tenant was never scrubbed, or its last scrub finished `interval` seconds ago or more."""
    last = load_state(state_dir, tenant).last
    return last is None or now - last.finished >= interval


def position(name: str) -> float:
    """A stable place in [0, 1) for an object name: which run of the rotation reads it."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def selected(name: str, cursor: float, share: float) -> bool:
    """Whether a run whose window starts at `cursor` reads `name`; windows of successive runs tile [0, 1)."""
    return share >= 1.0 or (position(name) - cursor) % 1.0 < share
