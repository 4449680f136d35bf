"""Object names: the only module that formats or parses object keys.

A tenant repository lives under ``<tenant>/`` at a site (the site's own bucket and prefix come first, added
by the store). Names are opaque: content ids and random unique ids in hex, and source names replaced by a
keyed tag so that a site learns nothing from a listing.

    <tenant>/config                         plaintext JSON: format version, suite, parameters
    <tenant>/keys/<slot id>                 plaintext JSON: a key slot (the master key, wrapped)
    <tenant>/data/<id[:2]>/<id>             a sealed pack of blobs
    <tenant>/index/<id>                     a sealed index (blob id -> pack, offset, length)
    <tenant>/snapshots/<source tag>/<id>    a sealed snapshot record
    <tenant>/prune/<id>                     a sealed prune marker (packs condemned, awaiting deletion)
    <tenant>/logs/<source tag>/<name>       a sealed change-log segment of a log source
    <tenant>/wal/<source tag>/<wal name>    a sealed WAL file of a postgres source (PostgreSQL's own name)
    <tenant>/audit/<name>                   a sealed batch of the API's audit log (in the audit tenant only)
    <tenant>/drills/<id>                    a sealed DR drill report (evidence)
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from drsvc.core.errors import RepositoryError

_HEX = re.compile(r"^[0-9a-f]{16,64}$")
_TENANT = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class Kind(enum.Enum):
    CONFIG = "config"
    KEY = "keys"
    PACK = "data"
    INDEX = "index"
    SNAPSHOT = "snapshots"
    PRUNE = "prune"
    SEGMENT = "logs"
    WAL = "wal"
    AUDIT = "audit"
    DRILL = "drills"


_PER_SOURCE = (Kind.SNAPSHOT, Kind.SEGMENT, Kind.WAL)
# PostgreSQL's WAL, history and backup-label file names, as archive_command passes them
_WAL_NAME = re.compile(r"^[0-9A-F]{24}(\.partial|\.[0-9A-F]{8}\.backup)?$|^[0-9A-F]{8}\.history$")


@dataclass(frozen=True, order=True)
class Handle:
    """A typed name of one object in one tenant repository."""

    kind: Kind
    name: str = ""
    source_tag: str = ""

    def __post_init__(self) -> None:
        if self.kind is Kind.CONFIG:
            if self.name:
                raise ValueError("the config object has no name")
            return
        if self.kind is Kind.WAL:
            if not _WAL_NAME.fullmatch(self.name):
                raise ValueError(f"not a PostgreSQL WAL, history or backup file name: {self.name!r}")
        elif not _HEX.fullmatch(self.name):
            raise ValueError(f"object name must be lowercase hex: {self.name!r}")
        if (self.kind in _PER_SOURCE) != bool(self.source_tag):
            raise ValueError("a source tag is required for snapshots, segments and WAL, and only for them")
        if self.source_tag and not _HEX.fullmatch(self.source_tag):
            raise ValueError(f"source tag must be lowercase hex: {self.source_tag!r}")

    def __str__(self) -> str:
        return f"{self.kind.value}/{self.name}" if self.name else self.kind.value


def check_tenant(tenant: str) -> str:
    if not _TENANT.fullmatch(tenant):
        raise ValueError(f"tenant name must match {_TENANT.pattern}: {tenant!r}")
    return tenant


@dataclass(frozen=True)
class Layout:
    """Maps handles of one tenant's repository to store keys and back."""

    tenant: str

    def __post_init__(self) -> None:
        check_tenant(self.tenant)

    @property
    def root(self) -> str:
        return f"{self.tenant}/"

    def key(self, h: Handle) -> str:
        if h.kind is Kind.CONFIG:
            return f"{self.tenant}/config"
        if h.kind is Kind.PACK:
            return f"{self.tenant}/data/{h.name[:2]}/{h.name}"
        if h.kind in _PER_SOURCE:
            return f"{self.tenant}/{h.kind.value}/{h.source_tag}/{h.name}"
        return f"{self.tenant}/{h.kind.value}/{h.name}"

    def prefix(self, kind: Kind, source_tag: str = "") -> str:
        """The key prefix under which every object of `kind` (of one source, for snapshots) is listed."""
        if kind in _PER_SOURCE and source_tag:
            return f"{self.tenant}/{kind.value}/{source_tag}/"
        return f"{self.tenant}/{kind.value}/" if kind is not Kind.CONFIG else f"{self.tenant}/config"

    def parse(self, key: str) -> Handle:
        """The handle of a store key; raises RepositoryError for a key that is not ours."""
        parts = key.split("/")
        try:
            if parts[0] != self.tenant:
                raise ValueError("other tenant")
            kind = Kind(parts[1])
            if kind is Kind.CONFIG and len(parts) == 2:
                return Handle(kind)
            if kind is Kind.PACK and len(parts) == 4 and parts[2] == parts[3][:2]:
                return Handle(kind, parts[3])
            if kind in _PER_SOURCE and len(parts) == 4:
                return Handle(kind, parts[3], parts[2])
            if kind in (Kind.KEY, Kind.INDEX, Kind.PRUNE, Kind.AUDIT, Kind.DRILL) and len(parts) == 3:
                return Handle(kind, parts[2])
        except (ValueError, IndexError) as exc:
            raise RepositoryError(f"not an object of this repository: {exc}", key=key) from None
        raise RepositoryError("not an object of this repository", key=key)
