"""A drill plan: which sources to restore, from which sites, to which points, and what to prove.

A plan is a TOML file (``drsvc drill --plan FILE``) or the same table as a dict (``POST /v1/drills``)::

    name = "weekly"                 # default: the file's stem ("drill" for a dict)
    seed = 20260101                 # for the random earlier point; default: a random one, kept in the report
    scratch = "/srv/drills"         # where the scratch restores go; default: [drill] dir (else
                                    # <state.dir>/drills) + "/scratch"; inside [restore] roots when set
    postgres_timeout = "10m"        # a restored PostgreSQL must finish recovery within this (default 5m)

    [[sources]]
    source = "hr-files"
    sites = ["jinan-dr", "qingdao-dr"]   # default: every site of the source's copy policy
    points = ["latest", "earlier"]       # default: both
    rpo_target = "15m"                   # default: the source's rpo_target / rto_target in the config
    rto_target = "1h"
    verify_source = true                 # tree and log sources (default true); not for postgres

    [[sources]]
    source = "hr-db"                     # a postgres source: probes run on the restored server
    probes = [{sql = "SELECT count(*) FROM staff", expect = "42"}]

Validation names the plan key that is wrong (``sources[1].sites``), as the config does.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drsvc.core.config import Config, Duration
from drsvc.core.errors import ConfigError

Point = Literal["latest", "earlier"]
POINTS: tuple[Point, ...] = ("latest", "earlier")
DEFAULT_POSTGRES_TIMEOUT = 300.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProbeSpec(_Model):
    sql: str = Field(min_length=1)
    expect: str | int | float | bool
    database: str = "postgres"


class SourceSpec(_Model):
    source: str
    sites: tuple[str, ...] | None = Field(default=None, min_length=1)
    points: tuple[Point, ...] = Field(default=POINTS, min_length=1)
    rpo_target: Duration | None = None
    rto_target: Duration | None = None
    verify_source: bool | None = None
    probes: tuple[ProbeSpec, ...] = ()
    user: str = "postgres"  # postgres: the database role the probes connect as


class PlanSpec(_Model):
    name: str = Field(default="drill", min_length=1, max_length=120)
    seed: int | None = None
    scratch: Path | None = None
    postgres_timeout: Duration = DEFAULT_POSTGRES_TIMEOUT
    sources: tuple[SourceSpec, ...] = Field(min_length=1)


@dataclass(frozen=True)
class Probe:
    sql: str
    expect: str  # compared with psql -At output, stripped
    database: str


@dataclass(frozen=True)
class SourcePlan:
    """One source of a plan, every default resolved against the config."""

    source: str
    tenant: str
    kind: Literal["tree", "log", "postgres"]
    sites: tuple[str, ...]
    points: tuple[Point, ...]
    rpo_target_s: float | None
    rto_target_s: float | None
    verify_source: bool
    probes: tuple[Probe, ...]
    user: str


@dataclass(frozen=True)
class Plan:
    name: str
    seed: int | None
    scratch: Path
    postgres_timeout_s: float
    sources: tuple[SourcePlan, ...]

    @property
    def scenario_count(self) -> int:
        return sum(len(s.sites) * len(s.points) for s in self.sources)


def load_plan(path: str | Path, config: Config) -> Plan:
    """Read and check a TOML plan file; relative ``scratch`` paths are taken from the file's directory."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_bytes().decode())
    except OSError as exc:
        raise ConfigError(f"cannot read the drill plan: {exc.strerror}", key=str(p)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the drill plan is not valid TOML: {exc}", key=str(p)) from None
    data.setdefault("name", p.stem)
    scratch = data.get("scratch")
    if isinstance(scratch, str) and not Path(scratch).is_absolute():
        data["scratch"] = str(p.resolve().parent / scratch)
    return parse_plan(data, config)


def parse_plan(data: Mapping[str, Any], config: Config) -> Plan:
    """Check a plan (a parsed TOML table or a JSON object) against `config`; ConfigError names the key."""
    try:
        spec = PlanSpec.model_validate(dict(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(
            f"drill plan: {msg}{more}", key=f"plan.{key}" if key else "plan", hint=_HINT
        ) from None
    seen: set[str] = set()
    sources = []
    for i, s in enumerate(spec.sources):
        sources.append(_resolve(s, f"plan.sources[{i}]", config))
        if s.source in seen:
            raise ConfigError(
                f"drill plan: source {s.source!r} is listed twice",
                key=f"plan.sources[{i}].source",
                hint=_HINT,
            )
        seen.add(s.source)
    scratch = spec.scratch
    if scratch is None:
        scratch = (config.drill.dir or config.state.dir / "drills") / "scratch"
    elif not scratch.is_absolute():
        raise ConfigError(
            f"drill plan: scratch {str(scratch)!r} is not an absolute path", key="plan.scratch", hint=_HINT
        )
    return Plan(spec.name, spec.seed, scratch, spec.postgres_timeout, tuple(sources))


_HINT = "fix the named key in the drill plan (see deploy/drill-plan.example.toml)"


def _resolve(s: SourceSpec, key: str, config: Config) -> SourcePlan:
    sc = config.sources.get(s.source)
    if sc is None:
        raise ConfigError(
            f"drill plan: no source {s.source!r} in the config; configured: "
            f"{', '.join(sorted(config.sources)) or 'none'}",
            key=f"{key}.source",
            hint=_HINT,
        )
    sites = s.sites if s.sites is not None else sc.sites
    for site in sites:
        if site not in sc.sites:
            raise ConfigError(
                f"drill plan: site {site!r} is not in the copy policy of source {s.source!r} "
                f"({', '.join(sc.sites)})",
                key=f"{key}.sites",
                hint=_HINT,
            )
    if len(set(sites)) != len(sites):
        raise ConfigError("drill plan: sites lists a site twice", key=f"{key}.sites", hint=_HINT)
    if len(set(s.points)) != len(s.points):
        raise ConfigError("drill plan: points lists a point twice", key=f"{key}.points", hint=_HINT)
    if sc.type == "postgres":
        if s.verify_source:
            raise ConfigError(
                "drill plan: verify_source applies to tree and log sources; a postgres source is proved "
                "by its probes",
                key=f"{key}.verify_source",
                hint=_HINT,
            )
    elif s.probes:
        raise ConfigError(
            f"drill plan: probes apply to postgres sources; {s.source!r} is a {sc.type} source",
            key=f"{key}.probes",
            hint=_HINT,
        )
    return SourcePlan(
        source=s.source,
        tenant=sc.tenant,
        kind=sc.type,
        sites=tuple(sites),
        points=s.points,
        rpo_target_s=s.rpo_target if s.rpo_target is not None else sc.rpo_target,
        rto_target_s=s.rto_target if s.rto_target is not None else sc.rto_target,
        verify_source=sc.type != "postgres" and (s.verify_source is None or s.verify_source),
        probes=tuple(Probe(p.sql, _expect_text(p.expect), p.database) for p in s.probes),
        user=s.user,
    )


def _expect_text(v: str | int | float | bool) -> str:
    """What psql -At prints for the expected value: booleans as t/f, numbers as written."""
    if isinstance(v, bool):
        return "t" if v else "f"
    return str(v)
