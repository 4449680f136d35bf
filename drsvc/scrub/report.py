"""What a scrub returns: its findings, the objects no site holds intact, and its progress."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from drsvc.core.format import SnapshotRecord


class FindingKind(enum.StrEnum):
    MISSING = "missing"  # a site lacks an object it should hold
    CORRUPT = "corrupt"  # a copy failed verification
    SIZE = "size"  # a copy's size differs from that of a copy that verified
    EXTRA = "extra"  # ours, but nothing expects it at this site (in flight, or garbage for prune)
    STRAY = "stray"  # a key under the tenant that is not an object of our layout
    UNREACHABLE = "unreachable"  # the site could not be listed or read


DAMAGE = frozenset({FindingKind.MISSING, FindingKind.CORRUPT, FindingKind.SIZE})


@dataclass
class Finding:
    site: str
    kind: FindingKind
    # "data/<id>", "index/<id>", "snapshots/<tag>/<id>", "logs/<tag>/<name>", "wal/<tag>/<name>", "keys/<id>",
    # "config"; a stray: its key; objects of one source counted in one finding: "<kind>/<tag>/"
    object: str
    detail: str = ""
    repaired: bool = False
    repair_error: str | None = None

    @property
    def damage(self) -> bool:
        return self.kind in DAMAGE


@dataclass(frozen=True)
class SnapshotRef:
    id: str
    source: str  # the source name, or "(tag <tag>)" when no configured source has the tag
    time_ns: int  # the recovery point; 0 when the record itself is lost


def snapshot_ref(rec: SnapshotRecord) -> SnapshotRef:
    return SnapshotRef(rec.id, rec.source, rec.time_ns)


@dataclass
class Unrecoverable:
    """An object that no reachable site holds intact."""

    object: str
    detail: str
    sites: list[str]  # sites holding a copy that failed verification
    breaks: list[SnapshotRef] = field(default_factory=list)


@dataclass
class ScrubReport:
    tenant: str
    started: float
    finished: float = 0.0
    read_share: float = 1.0
    repair: bool = True
    sites: list[str] = field(default_factory=list)
    objects: int = 0
    copies: int = 0
    copies_read: int = 0
    bytes_verified: int = 0
    in_flight: int = 0  # copies missing at a site that the local outbox has still to ship there
    findings: list[Finding] = field(default_factory=list)
    unrecoverable: list[Unrecoverable] = field(default_factory=list)

    @property
    def damage(self) -> list[Finding]:
        return [f for f in self.findings if f.damage]

    @property
    def repairs(self) -> int:
        return sum(1 for f in self.findings if f.repaired)

    @property
    def unrepaired(self) -> list[Finding]:
        return [f for f in self.damage if not f.repaired]

    @property
    def unreachable(self) -> dict[str, str]:
        return {f.site: f.detail for f in self.findings if f.kind is FindingKind.UNREACHABLE}

    @property
    def clean(self) -> bool:
        """Nothing damaged, lost or unreachable (extra and stray objects are notices)."""
        return not self.damage and not self.unrecoverable and not self.unreachable

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScrubReport:
        d = dict(d)
        d["findings"] = [Finding(**{**f, "kind": FindingKind(f["kind"])}) for f in d.get("findings", [])]
        d["unrecoverable"] = [
            Unrecoverable(**{**u, "breaks": [SnapshotRef(**b) for b in u.get("breaks", [])]})
            for u in d.get("unrecoverable", [])
        ]
        return cls(**d)


@dataclass(frozen=True)
class ScrubProgress:
    phase: str  # "list", "config", "records", "indexes", "packs", "changelogs", "repair", "walk"
    done: int
    total: int
    object: str = ""
    read: tuple[str, ...] = ()  # the sites whose copy of `object` was downloaded and verified
