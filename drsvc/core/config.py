"""The TOML configuration, validated at the edge into frozen, typed objects.

Errors name the key that is wrong (``sources.hr.min_copies``). Secrets (site credentials, passphrases) are
read from files or environment variables; an inline value is accepted for tests and demos only.
"""

from __future__ import annotations

import datetime
import fnmatch
import functools
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from drsvc.core.errors import ConfigError
from drsvc.core.retention import Policy

_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.I)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_size(value: int | str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):  # pydantic reports only ValueError as a validation error
        raise ValueError(f"not a size: {value!r} (write e.g. 8MiB, 500MB or 1048576)")
    m = _SIZE.match(value)
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (write e.g. 8MiB, 500MB or 1048576)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]  # 8MiB, 500MB or 1048576

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: int | float | str) -> float:
    if isinstance(value, bool):
        raise ValueError("not a duration: a boolean")
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"not a duration: {value!r} (write e.g. 30s, 15m, 6h, 1d or a number of seconds)")
    return float(m.group(1)) * _SECONDS[m.group(2) or "s"]


Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


def parse_point(text: str) -> int | None:
    """A point in time as the CLI (--at) and the API take it: 'latest' -> None; ISO 8601 (local time if no
    zone) or @epoch-seconds -> UTC nanoseconds; ValueError naming the problem for anything else."""
    if text == "latest":
        return None
    if text.startswith("@"):
        try:
            seconds = float(text[1:])
        except ValueError:
            raise ValueError(f"not a time: {text!r} (@ must be followed by epoch seconds)") from None
        if not math.isfinite(seconds) or not 0 <= seconds < 2**63 / 1e9:
            raise ValueError(f"not a time: {text!r} (epoch seconds out of range)")
        return int(seconds * 1e9)
    try:
        t = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use 'latest', ISO 8601 like 2026-11-25T08:00:00+08:00, or @epoch-seconds)"
        ) from None
    if t.tzinfo is None:
        t = t.astimezone()
    return int(t.timestamp() * 1e9)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Secret(_Model):
    """A secret from a file (first line, or whole file for key files), an environment variable, or inline."""

    file: Path | None = None
    env: str | None = None
    value: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Secret:
        if sum(x is not None for x in (self.file, self.env, self.value)) != 1:
            raise ValueError("give exactly one of file, env, value")
        return self

    def read_bytes(self, what: str) -> bytes:
        if self.file is not None:
            try:
                return self.file.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read {what} file {self.file}: {exc.strerror}", key=what) from None
        if self.env is not None:
            val = os.environ.get(self.env)
            if val is None:
                raise ConfigError(f"environment variable {self.env} is not set", key=what)
            return val.encode()
        assert self.value is not None
        return self.value.encode()

    def read_text(self, what: str) -> str:
        raw = self.read_bytes(what).decode()
        return raw.splitlines()[0] if self.file is not None and raw else raw


class KeyConfig(_Model):
    """How this host opens a tenant's repository: a passphrase, or a key file."""

    passphrase: Secret | None = None
    keyfile: Path | None = None

    @model_validator(mode="after")
    def _one(self) -> KeyConfig:
        if (self.passphrase is None) == (self.keyfile is None):
            raise ValueError("give exactly one of passphrase, keyfile")
        return self

    def material(self, tenant: str) -> tuple[str, bytes]:
        if self.passphrase is not None:
            return "passphrase", self.passphrase.read_text(f"tenants.{tenant}.key.passphrase").encode()
        assert self.keyfile is not None
        try:
            return "keyfile", self.keyfile.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read key file {self.keyfile}: {exc.strerror}", key=f"tenants.{tenant}.key.keyfile"
            ) from None


class ChunkerConfig(_Model):
    min_size: Size = 16 * 1024
    avg_size: Size = 64 * 1024
    max_size: Size = 256 * 1024

    @model_validator(mode="after")
    def _order(self) -> ChunkerConfig:
        # the bounds of pyfastcdc's FastCDC 2020
        if not (
            64 <= self.min_size <= 1024**2
            and 256 <= self.avg_size <= 4 * 1024**2
            and 1024 <= self.max_size <= 16 * 1024**2
            and self.min_size <= self.avg_size <= self.max_size
        ):
            raise ValueError(
                "need min_size in 64..1MiB, avg_size in 256..4MiB, max_size in 1KiB..16MiB, "
                "and min_size <= avg_size <= max_size"
            )
        return self


class TenantConfig(_Model):
    key: KeyConfig
    suite: Literal["aes-256-gcm", "sm4-gcm"] = "aes-256-gcm"
    chunker: ChunkerConfig = ChunkerConfig()
    pack_size: Size = 8 * 1024 * 1024
    compression_level: int = Field(default=1, ge=-7, le=19)

    @field_validator("pack_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)


class LocalSiteConfig(_Model):
    type: Literal["local"]
    path: Path
    fsync: bool = True
    bandwidth: Size | None = None  # bytes per second to and from this site (e.g. "20MiB"); unset: no limit
    concurrency: int = Field(default=4, ge=1, le=64)
    object_lock: Duration | None = None  # refused: a directory cannot enforce retention (see the validator)

    @field_validator("object_lock")
    @classmethod
    def _no_lock(cls, v: float | None) -> float | None:
        if v is not None:
            raise ValueError(
                "a local-directory site cannot lock objects (anyone with write access to the directory can "
                "delete them); remove object_lock here, or use an S3 site whose bucket has object lock "
                "enabled"
            )
        return v


class S3SiteConfig(_Model):
    type: Literal["s3"]
    endpoint: str
    bucket: str
    prefix: str = ""
    secure: bool = True
    region: str | None = None
    access_key: Secret
    secret_key: Secret
    concurrency: int = Field(default=4, ge=1, le=256)  # uploads in flight; each holds up to one pack
    timeout: float = Field(default=30.0, gt=0)
    create_bucket: bool = False
    bandwidth: Size | None = None  # bytes per second to and from this site (e.g. "20MiB"); unset: no limit
    # Object lock: every object is written with COMPLIANCE retention for this long (e.g. "30d"), so nobody
    # holding the site's credentials can delete it earlier. The bucket must have object lock enabled
    # (create_bucket makes it so); a bucket without it is an error at start, never silently unlocked.
    object_lock: Duration | None = None

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", v):
            raise ValueError("bucket names are 3-63 characters: lowercase letters, digits, dots and hyphens")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if "://" in v or "/" in v:
            raise ValueError("endpoint is host:port, without scheme or path (set secure for https)")
        return v


SiteConfig = Annotated[LocalSiteConfig | S3SiteConfig, Field(discriminator="type")]


class RetentionConfig(_Model):
    """Which snapshots `drsvc forget` keeps (drsvc.core.retention: restic's rules, buckets in local time).

    Counts of 0 disable a rule; `keep_within` is a duration ("7d", "36h", or seconds). At least one rule.
    """

    keep_last: int = Field(default=0, ge=0)
    keep_hourly: int = Field(default=0, ge=0)
    keep_daily: int = Field(default=0, ge=0)
    keep_weekly: int = Field(default=0, ge=0)
    keep_monthly: int = Field(default=0, ge=0)
    keep_yearly: int = Field(default=0, ge=0)
    keep_within: Duration | None = None
    keep_min: int = Field(default=0, ge=0)  # never keep fewer than this many snapshots

    @model_validator(mode="after")
    def _some_rule(self) -> RetentionConfig:
        if self.policy().empty:
            raise ValueError(
                "give at least one of keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, "
                "keep_yearly, keep_within, keep_min (an empty policy would forget nothing)"
            )
        return self

    def policy(self) -> Policy:
        return Policy(
            keep_last=self.keep_last,
            keep_hourly=self.keep_hourly,
            keep_daily=self.keep_daily,
            keep_weekly=self.keep_weekly,
            keep_monthly=self.keep_monthly,
            keep_yearly=self.keep_yearly,
            keep_within=self.keep_within,
            keep_min=self.keep_min,
        )


class SourceConfig(_Model):
    tenant: str
    # tree: a directory tree, snapshotted; log: a directory of append-only files, streamed as change-log
    # segments; postgres: a PostgreSQL cluster, base backups plus WAL from archive_command
    type: Literal["tree", "log", "postgres"]
    path: Path  # tree and log: the directory; postgres: the data directory (PGDATA)
    sites: tuple[str, ...] = Field(min_length=1)
    min_copies: int = Field(default=1, ge=1)
    exclude: tuple[str, ...] = ()
    page_files: tuple[str, ...] = ("*.db", "*.sqlite", "*.sqlite3", "*.ibd", "*.mdf", "*.ndf", "*.dbf")
    # database-like files: fixed chunks aligned to the file start, a multiple of common page sizes
    # (4/8/16 KiB); 32 KiB stores ~1.4x the real change of scattered page writes (benchmarks/results)
    page_chunk: Size = Field(default=32 * 1024, ge=4096, le=4 * 1024 * 1024)
    one_file_system: bool = True
    # when the daemon snapshots: every `interval` (seconds, or "15m", "6h", "1d"), and/or at the local
    # times of day in `at` ("02:00"); neither given: every hour. Targets feed RPO alerts and `drsvc status`.
    interval: Duration | None = None
    at: tuple[Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")], ...] = ()
    rpo_target: Duration | None = None
    rto_target: Duration | None = None
    retention: RetentionConfig | None = None  # what `drsvc forget` keeps; unset: forget refuses
    # tree: snapshot on inotify events (debounced), with periodic full rescans; RPO of seconds
    watch: bool = False
    # log: new bytes are cut into a segment at least this often, or when segment_max bytes are waiting
    sync_interval: Duration = 1.0
    segment_max: Size = Field(default=16 * 1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024)
    # postgres: libpq connection string for base backups (pg_basebackup -d), and where PostgreSQL's
    # programs are (default: the newest /usr/lib/postgresql/*/bin)
    conninfo: str | None = None
    pg_bindir: Path | None = None
    # postgres: where `drsvc wal-push` (run by PostgreSQL's OS user) leaves WAL files for the daemon; default
    # <state.dir>/incoming/wal/<source>. Set it when the daemon's state directory is closed to that user
    # (deploy/README.md: a directory both users' group may write, e.g. mode 2770)
    incoming: Path | None = None

    @field_validator("watch")
    @classmethod
    def _watch_tree(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("type") != "tree":
            raise ValueError("watch applies to tree sources only")
        return v

    @field_validator("conninfo", "pg_bindir", "incoming")
    @classmethod
    def _postgres_only(cls, v: object, info: ValidationInfo) -> object:
        if v is not None and info.data.get("type") != "postgres":
            raise ValueError(f"{info.field_name} applies to postgres sources only")
        return v

    def next_due(self, last: float) -> float:
        """The first moment after a snapshot taken at `last` (epoch seconds) when the next one is due."""
        candidates = []
        interval = self.interval if self.interval is not None else (None if self.at else 3600.0)
        if interval is not None:
            candidates.append(last + interval)
        if self.at:
            today = datetime.datetime.fromtimestamp(last).date()  # local date
            for day in (0, 1, 2):
                for hhmm in self.at:
                    h, m = (int(x) for x in hhmm.split(":"))
                    # a naive local time: .timestamp() applies that date's own UTC offset (DST)
                    t = datetime.datetime.combine(today + datetime.timedelta(days=day), datetime.time(h, m))
                    if t.timestamp() > last:
                        candidates.append(t.timestamp())
        return min(candidates)

    # field validators, not a model validator, so that the error names the key (sources.<name>.min_copies)
    @field_validator("sites")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("sites lists a site twice")
        return v

    @field_validator("min_copies")
    @classmethod
    def _copies(cls, v: int, info: ValidationInfo) -> int:
        sites = info.data.get("sites")
        if sites is not None and v > len(sites):
            raise ValueError(f"min_copies = {v} but only {len(sites)} sites are listed")
        return v

    def is_excluded(self, rel: str) -> bool:
        """Whether a path (relative to the source root) or its base name matches an exclude pattern."""
        if not self.exclude:
            return False
        return (
            _matcher(self.exclude)(rel) is not None
            or _matcher(self.exclude)(rel.rsplit("/", 1)[-1]) is not None
        )

    def is_page_file(self, rel: str) -> bool:
        return bool(self.page_files) and _matcher(self.page_files)(rel.rsplit("/", 1)[-1]) is not None


@functools.lru_cache(maxsize=64)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """One compiled regular expression for a tuple of shell patterns (fnmatch semantics, case-sensitive)."""
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match


class StateConfig(_Model):
    dir: Path
    spool_quota: Size = 10 * 1024**3

    @field_validator("spool_quota", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"``, ``"localhost:8080"`` or ``"[::1]:8080"`` -> ``(host, port)``; else ValueError."""
    hint = "expected HOST:PORT, e.g. 127.0.0.1:9464 or [::1]:9464"
    host, sep, port_text = listen.rpartition(":")
    if not sep or listen.endswith("]"):
        raise ValueError(f"listen address {listen!r} has no port: {hint}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"listen address {listen!r}: {host!r} is not an IPv6 address") from None
    elif "[" in host or "]" in host:
        raise ValueError(f"listen address {listen!r}: unbalanced brackets; {hint}")
    elif ":" in host:
        raise ValueError(f"listen address {listen!r}: put an IPv6 address in brackets, e.g. [::1]:9464")
    if not host:
        raise ValueError(f"listen address {listen!r} has no host (use 0.0.0.0 or [::] for all interfaces)")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"listen address {listen!r}: port {port_text!r} is not a number; {hint}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"listen address {listen!r}: port {port} is out of range 0-65535")
    return host, port


class DaemonConfig(_Model):
    listen: str = "127.0.0.1:8080"  # the HTTP listener: /metrics, /healthz, /readyz

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    drain_timeout: Duration = 20.0  # SIGTERM: seconds to finish in-flight uploads (keep below TimeoutStopSec)
    tick: Duration = 1.0  # supervisor loop period: metrics, status line, watchdog progress


class ScrubConfig(_Model):
    """`drsvc scrub` and the daemon's scrub schedule (drsvc/scrub.py)."""

    interval: Duration | None = None  # the daemon scrubs every tenant this often; unset: only `drsvc scrub`
    read_share: float = Field(default=0.1, gt=0, le=1)  # share of the packs downloaded and verified per run


class PruneConfig(_Model):
    """`drsvc prune` and the daemon's prune schedule (drsvc/prune.py)."""

    interval: Duration | None = None  # the daemon prunes every tenant this often; unset: only `drsvc prune`
    # An unreferenced pack is condemned by one prune run and deleted by a later one at least `grace` after;
    # keep it longer than the longest snapshot plus the longest time a site may be down.
    grace: Duration = 24 * 3600.0
    repack_waste: float = Field(default=0.25, ge=0, le=1)  # repack a partly used pack above this unused share


Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")  # each role may do what the ones before it may


class TokenConfig(_Model):
    """One API bearer token, stored as a hash: `drsvc token new` prints the token once and this entry."""

    hash: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]  # "sha256:" + hex SHA-256 of the token
    role: Role
    # tenant names, or ["*"] for every tenant: required, so that a token's scope is always written down
    # (the empty default stands for "not given" and is refused by the validator, naming the key)
    tenants: tuple[str, ...] = Field(default=(), validate_default=True)

    @field_validator("tenants")
    @classmethod
    def _scope(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(
                'a token must name the tenants it may see and act on: tenants = ["fin", ...], or ["*"] '
                "for every tenant, written out"
            )
        return v


class ApiConfig(_Model):
    """The HTTP API under /v1 on the daemon's listener (drsvc/api/)."""

    # [api.tokens.<name>]: the name is who made a request, in the audit log
    tokens: dict[Annotated[str, Field(pattern=_NAME)], TokenConfig] = {}
    tokens_file: Path | None = None  # a TOML file of more [tokens.<name>] tables, re-read on SIGHUP
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, the listener speaks HTTPS only
    tls_key: Path | None = None
    max_restores: int = Field(default=2, ge=1, le=64)  # restore and drill jobs running at once

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise _KeyError("api.tls_key" if self.tls_key is None else "api.tls_cert", "give both or neither")
        return self


class RestoreConfig(_Model):
    """Where restores may write. Empty: the CLI restores anywhere, the API refuses every restore."""

    roots: tuple[Path, ...] = ()  # absolute directories; a restore target must lie inside one of them

    @field_validator("roots")
    @classmethod
    def _absolute(cls, v: tuple[Path, ...]) -> tuple[Path, ...]:
        for root in v:
            if not root.is_absolute():
                raise ValueError(f"restore root {str(root)!r} is not an absolute path")
        return v

    def check_target(self, target: Path) -> Path:
        """`target` made absolute with every symlink resolved, if it lies inside a root (or no roots are
        set); else ConfigError naming the target and the roots. A target that does not exist yet is judged
        by its nearest existing ancestor, so a symlink on the way cannot lead out of the roots."""
        resolved = Path(os.path.realpath(target))
        if not self.roots:
            return resolved
        for root in self.roots:
            if resolved.is_relative_to(os.path.realpath(root)):
                return resolved
        raise ConfigError(
            f"restore target {str(target)!r} (resolved: {str(resolved)!r}) is outside the restore roots "
            f"{', '.join(map(str, self.roots))}",
            key="restore.roots",
        )


class AuditConfig(_Model):
    """The audit log of mutating API requests (drsvc/audit.py): append-only, hash-chained."""

    dir: Path | None = None  # default: <state.dir>/audit
    keep: Duration = 180 * 86400.0  # at least 180 days (MLPS level 3)
    hash: Literal["sha256", "sm3"] = "sha256"
    # the tenant whose repository holds the sealed copies of the log, at every site of that tenant;
    # required when the API has tokens (the Config validator)
    tenant: str | None = None

    @field_validator("keep")
    @classmethod
    def _keep(cls, v: float) -> float:
        if v < 180 * 86400.0:
            raise ValueError(f"audit records must be kept at least 180 days (180d); got {v / 86400:g} days")
        return v


class DrillConfig(_Model):
    """DR drills (drsvc/drill/)."""

    dir: Path | None = None  # reports (JSON and HTML) and scratch restores; default: <state.dir>/drills


class Config(_Model):
    state: StateConfig
    api: ApiConfig = ApiConfig()
    restore: RestoreConfig = RestoreConfig()
    audit: AuditConfig = AuditConfig()
    drill: DrillConfig = DrillConfig()
    daemon: DaemonConfig = DaemonConfig()
    scrub: ScrubConfig = ScrubConfig()
    prune: PruneConfig = PruneConfig()
    tenants: dict[Annotated[str, Field(pattern=_NAME)], TenantConfig]
    sites: dict[Annotated[str, Field(pattern=_NAME)], SiteConfig]
    sources: dict[Annotated[str, Field(pattern=_NAME)], SourceConfig]
    path: Path | None = None

    @model_validator(mode="after")
    def _references(self) -> Config:
        if self.audit.tenant is not None and self.audit.tenant not in self.tenants:
            raise _KeyError("audit.tenant", f"unknown tenant {self.audit.tenant!r}")
        for name, tok in self.api.tokens.items():
            for t in tok.tenants:
                if t != "*" and t not in self.tenants:
                    raise _KeyError(f"api.tokens.{name}.tenants", f"unknown tenant {t!r}")
        if (self.api.tokens or self.api.tokens_file is not None) and self.audit.tenant is None:
            raise _KeyError(
                "audit.tenant",
                "the API is enabled (api.tokens or api.tokens_file) but [audit] tenant is not set: the audit "
                "log of its requests must be replicated to the sites, in the repository of that tenant "
                "(without the sites' copies, removing the newest records cannot be detected)",
            )
        for name, src in self.sources.items():
            if src.tenant not in self.tenants:
                raise _KeyError(f"sources.{name}.tenant", f"unknown tenant {src.tenant!r}")
            for site in src.sites:
                if site not in self.sites:
                    raise _KeyError(f"sources.{name}.sites", f"unknown site {site!r}")
        return self

    def source(self, name: str) -> SourceConfig:
        try:
            return self.sources[name]
        except KeyError:
            raise ConfigError(
                f"no source {name!r}; configured: {', '.join(sorted(self.sources)) or 'none'}", key="sources"
            ) from None

    def inline_secrets(self) -> list[str]:
        """Keys whose secret is written in the config itself (fine for tests and demos, not for production:
        the config file is readable by more people than the key material should be)."""
        out = []
        for name, t in self.tenants.items():
            if t.key.passphrase is not None and t.key.passphrase.value is not None:
                out.append(f"tenants.{name}.key.passphrase")
        for name, site in self.sites.items():
            if isinstance(site, S3SiteConfig):
                out += [
                    f"sites.{name}.{k}"
                    for k in ("access_key", "secret_key")
                    if getattr(site, k).value is not None
                ]
        return out

    def tenant_sites(self, tenant: str) -> list[str]:
        """Every site that any source of `tenant` uses, in config order."""
        seen: dict[str, None] = {}
        for src in self.sources.values():
            if src.tenant == tenant:
                seen.update(dict.fromkeys(src.sites))
        return list(seen)


class _KeyError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


_PATH_KEYS = ("path", "dir", "file", "keyfile", "tokens_file", "tls_cert", "tls_key", "incoming")


def _resolve(base: Path, data: Any) -> Any:
    """Make relative paths in the config relative to the config file's directory."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if k in _PATH_KEYS and isinstance(v, str) and not os.path.isabs(v):
                out[k] = str(base / v)
            else:
                out[k] = _resolve(base, v)
        return out
    return data


def parse_config(data: dict[str, Any], base: Path | None = None, path: Path | None = None) -> Config:
    if base is not None:
        data = _resolve(base, data)
    try:
        return Config.model_validate({**data, "path": path})
    except ValidationError as exc:
        err = exc.errors()[0]
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _KeyError):
            raise ConfigError(str(ctx_err), key=ctx_err.key) from None
        loc = list(err["loc"])
        if len(loc) > 2 and loc[0] == "sites" and loc[2] in ("local", "s3"):
            del loc[2]  # the union's tag, not a key (a site may itself be named "local" or "s3")
        key = ".".join(str(p) for p in loc if not str(p).endswith("SiteConfig"))
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{msg}{more}", key=key or "(top level)") from None


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", key=str(p)) from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", key=str(p)) from None
    return parse_config(data, base=p.resolve().parent, path=p)
