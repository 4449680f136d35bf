"""The GB/T 20988-2007 disaster-recovery capability level that a drill's measured RTO and RPO fit.

GB/T 20988-2007 (信息安全技术 信息系统灾难恢复规范) defines six capability levels. Each level is a set of
elements: data backup, backup data-processing system, backup network, technical support, operations, and a
disaster-recovery plan. Its informative annex relates the levels to typical RTO and RPO ranges; these are the
annex's indicative figures as drsvc documents them (docs/DRILLS.md):

    level  name                                                    RTO (annex)        RPO (annex)
    1      basic support                                           >= 2 days          1 to 7 days
    2      backup site support                                     >= 24 h            1 to 7 days
    3      electronic transfer and partial equipment support       >= 12 h            hours to 1 day
    4      electronic transfer and complete equipment support      hours to 2 days    hours to 1 day
    5      real-time data transfer and complete equipment support  minutes to 2 days  0 to 30 min
    6      zero data loss and remote cluster support               minutes            0

The ranges overlap and some are open, so drsvc fixes one upper bound per level (``LEVELS``), chosen so that
the bounds never loosen from one level to the next and each level is tighter than the one below in RTO or RPO:

1. RPO bound: the upper end of the level's own annex range (7 days; 1 day; 30 minutes; 0).
2. RTO bound: the lower figure of the level below, that is, a recovery faster than what the level below
   typically needs: level 2 <= 2 days, level 3 <= 24 h, level 4 <= 12 h. Level 1 has no bound (the annex gives
   "2 days or more"). Level 5 keeps level 4's 12 h (its annex range, "minutes to 2 days", is looser and the
   level is told apart by its RPO). Level 6's "minutes" is read as at most 60 minutes.

How a drill is rated (``gbt20988_level``):

1. Every scenario must have recovered: a measured RTO and RPO, the repository verified, the source (when
   compared) equal, every probe as expected. A scenario that did not recover gives level 0 for the drill.
2. A scenario meets a level when its RTO and its data loss are at most the level's bounds; the bounds are
   nested, so a scenario that meets a level meets every level below it. The data loss is ``rpo_s``, and for a
   ``latest`` point at least ``lag_s`` (the scenario's start minus the restored point) when the runner gives
   it: ``rpo_s`` of a latest point is measured from the newest protected point, so it omits the replication
   lag that a disaster at that moment would also have cost.
3. A source's level is the highest level that its worst scenario meets (every site, every point), and the
   drill's level is the lowest source level: the level that every source meets with its worst scenario.

The level is "consistent with" the measured RTO and RPO only. The standard's other elements (the backup site,
network, equipment, technical support staff, operations and maintenance, the disaster-recovery plan and its
management) are organisational and not assessed by drsvc; claiming a level needs them too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True)
class Level:
    number: int
    name: str
    name_zh: str
    rto_max_s: float  # math.inf: no bound
    rpo_max_s: float
    annex_rto: str
    annex_rpo: str

    def admits(self, rto_s: float, rpo_s: float) -> bool:
        return rto_s <= self.rto_max_s and rpo_s <= self.rpo_max_s


LEVELS: tuple[Level, ...] = (
    Level(1, "basic support", "基本支持", math.inf, 7 * DAY, ">= 2 days", "1 to 7 days"),
    Level(2, "backup site support", "备用场地支持", 2 * DAY, 7 * DAY, ">= 24 h", "1 to 7 days"),
    Level(
        3,
        "electronic transfer and partial equipment support",
        "电子传输和部分设备支持",
        DAY,
        DAY,
        ">= 12 h",
        "hours to 1 day",
    ),
    Level(
        4,
        "electronic transfer and complete equipment support",
        "电子传输及完整设备支持",
        12 * HOUR,
        DAY,
        "hours to 2 days",
        "hours to 1 day",
    ),
    Level(
        5,
        "real-time data transfer and complete equipment support",
        "实时数据传输及完整设备支持",
        12 * HOUR,
        30 * 60.0,
        "minutes to 2 days",
        "0 to 30 min",
    ),
    Level(
        6, "zero data loss and remote cluster support", "数据零丢失和远程集群支持", HOUR, 0.0, "minutes", "0"
    ),
)
NONE_NAME = "none"


def level_for(rto_s: float, rpo_s: float) -> int:
    """The highest level whose bounds admit one measured (RTO, RPO), 0 if none does."""
    best = 0
    for lv in LEVELS:
        if lv.admits(rto_s, rpo_s):
            best = lv.number
    return best


def level_name(number: int) -> str:
    return LEVELS[number - 1].name if 1 <= number <= len(LEVELS) else NONE_NAME


def duration(seconds: float) -> str:
    """A duration for people, three significant digits: '0 s', '42.5 s', '12 min', '1.5 h', '7 days'."""
    if math.isinf(seconds):
        return "no limit"
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < HOUR:
        return f"{seconds / 60:.3g} min"
    if seconds < 2 * DAY:
        return f"{seconds / HOUR:.3g} h"
    return f"{seconds / DAY:.3g} days"


def data_loss(sc: dict[str, Any]) -> float:
    """The RPO a level is judged on: ``rpo_s``, and for a latest point at least ``lag_s`` when present."""
    loss = float(sc["rpo_s"])
    lag = sc.get("lag_s")
    if sc.get("point") == "latest" and isinstance(lag, int | float) and not isinstance(lag, bool):
        loss = max(loss, float(lag))
    return loss


def _not_recovered(sc: dict[str, Any]) -> str | None:
    """Why a scenario gives no measurement, or None when it recovered and was verified."""
    if sc.get("rto_s") is None:
        return "no RTO measured (the restore did not finish)"
    if sc.get("rpo_s") is None:
        return "no RPO measured (the recovery point is unknown)"
    verified = sc.get("verified") or {}
    if verified.get("repository") is not True:
        return "the restored data was not verified"
    if verified.get("source") is False:
        return "the restored data differs from the source"
    if any(not p.get("ok") for p in verified.get("probes") or []):
        return "a probe did not return what was expected"
    return None


def _where(sc: dict[str, Any]) -> str:
    return f"{sc.get('source', '?')} at {sc.get('site', '?')} ({sc.get('point', '?')})"


def gbt20988_level(scenarios: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"gbt20988": 0..6, "name": str, "reason": str}``: the highest GB/T 20988-2007 level whose RTO and RPO
    bounds every source meets with its worst scenario (module docstring). 0 when there are no scenarios, one
    did not recover, or a measurement is beyond level 1."""
    if not scenarios:
        return {"gbt20988": 0, "name": NONE_NAME, "reason": "the drill has no scenarios"}
    for sc in scenarios:
        why = _not_recovered(sc)
        if why is not None:
            return {"gbt20988": 0, "name": NONE_NAME, "reason": f"{_where(sc)} did not recover: {why}"}
    by_source: dict[str, list[dict[str, Any]]] = {}
    for sc in scenarios:
        by_source.setdefault(str(sc.get("source")), []).append(sc)
    worst: dict[str, tuple[float, float]] = {
        src: (max(float(s["rto_s"]) for s in scs), max(data_loss(s) for s in scs))
        for src, scs in by_source.items()
    }
    per_source = {src: level_for(rto, rpo) for src, (rto, rpo) in worst.items()}
    number = min(per_source.values())
    limiting = sorted(src for src, n in per_source.items() if n == number)
    details = "; ".join(
        f"{src}: worst RTO {duration(worst[src][0])}, worst data loss {duration(worst[src][1])}"
        for src in limiting
    )
    if number == 0:
        reason = f"beyond level 1 (RTO no limit, RPO at most {duration(LEVELS[0].rpo_max_s)}): {details}"
        return {"gbt20988": 0, "name": NONE_NAME, "reason": reason}
    lv = LEVELS[number - 1]
    reason = f"every source within RTO {duration(lv.rto_max_s)} and RPO {duration(lv.rpo_max_s)}"
    if number < len(LEVELS):
        up = LEVELS[number]
        reason += (
            f"; level {up.number} needs RTO at most {duration(up.rto_max_s)} and RPO at most "
            f"{duration(up.rpo_max_s)}; limited by {details}"
        )
    return {"gbt20988": number, "name": lv.name, "reason": reason}
