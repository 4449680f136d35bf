"""Drill reports on disk: JSON for scripts and metrics, one self-contained HTML page for people.

1. ``write_report(dir, report)`` writes ``<started>-<id>.json`` and ``.html`` (each to a temporary name,
   fsync, rename, fsync of the directory), then ``last.json``, a copy of the newest report by ``finished``
   time, which the daemon's metrics read at each scrape.
2. ``render_html(report)`` is one page with inline CSS and inline SVG: no script, no external resource, every
   string from the report escaped. It shows the verdict, the GB/T 20988-2007 level, a chart of the RTO and RPO
   of every scenario against its source's targets (log scale), and a table of the scenarios.
3. ``load_report(path)`` reads one back.

The report's fields are the contract with the runner (drsvc/drill/runner.py) and are listed in docs/DRILLS.md.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from drsvc.core.config import Config
from drsvc.core.durable import write_file
from drsvc.drill import levels
from drsvc.drill.levels import LEVELS

LAST = "last.json"
_ID = re.compile(r"^[0-9a-f]{16,64}$")


def report_dir(config: Config) -> Path:
    """Where reports go: ``[drill] dir``, else ``<state.dir>/drills``."""
    return config.drill.dir or config.state.dir / "drills"


# -- files -----------------------------------------------------------------------------------------------


def _encode(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _stamp(iso: object) -> str:
    t = _parse_time(iso)
    return t.strftime("%Y%m%dT%H%M%SZ") if t is not None else "undated"


def _parse_time(iso: object) -> dt.datetime | None:
    if not isinstance(iso, str):
        return None
    try:
        t = dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


def write_report(dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write the report as JSON and HTML into `dir` (created if needed), each atomically, and make it
    ``last.json`` unless that holds a report that finished later. Returns (json path, html path)."""
    rid = str(report.get("id", ""))
    if not _ID.fullmatch(rid):
        raise ValueError(f"a report id must be 16 to 64 lowercase hex digits, not {rid!r}")
    stem = f"{_stamp(report.get('started'))}-{rid}"
    body = _encode(report)
    json_path, html_path = dir / f"{stem}.json", dir / f"{stem}.html"
    write_file(json_path, body, mode=0o640)
    write_file(html_path, render_html(report).encode(), mode=0o640)
    if _newer_than_last(dir / LAST, report):
        write_file(dir / LAST, body, mode=0o640)
    return json_path, html_path


def _newer_than_last(last: Path, report: dict[str, Any]) -> bool:
    try:
        old = load_report(last)
    except (OSError, ValueError):
        return True  # none yet, or unreadable: replace it
    mine, theirs = _parse_time(report.get("finished")), _parse_time(old.get("finished"))
    return theirs is None or (mine is not None and mine >= theirs)


def load_report(path: Path) -> dict[str, Any]:
    """One report written by write_report (or last.json). ValueError if it is not a JSON object."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a drill report (a JSON object)")
    return data


# -- formatting ------------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def duration(seconds: float | None) -> str:
    """levels.duration, and '–' for None."""
    return "–" if seconds is None else levels.duration(seconds)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _short(text: str, limit: int = 34) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the chart -------------------------------------------------------------------------------------------

# nice tick marks for a log axis of durations
_TICKS = (
    (0.01, "10 ms"),
    (0.1, "0.1 s"),
    (1.0, "1 s"),
    (10.0, "10 s"),
    (60.0, "1 min"),
    (600.0, "10 min"),
    (3600.0, "1 h"),
    (6 * 3600.0, "6 h"),
    (86400.0, "1 d"),
    (7 * 86400.0, "7 d"),
    (30 * 86400.0, "30 d"),
    (365 * 86400.0, "1 y"),
)
_LABEL_W, _PLOT_W, _ROW_H, _HEAD_H, _AXIS_H = 250, 560, 20, 20, 34
_OK, _MISS, _TARGET = "#2e86c1", "#c0392b", "#333"


def _axis(values: list[float]) -> tuple[float, float]:
    positive = [v for v in values if v > 0]
    if not positive:
        return 1.0, 60.0
    low, high = min(positive), max(positive) * 1.15
    lo = max([t for t, _ in _TICKS if t <= low / 3] or [_TICKS[0][0]])  # the shortest bar stays visible
    hi = min([t for t, _ in _TICKS if t >= high] or [_TICKS[-1][0]])
    if hi <= lo:
        hi = next((t for t, _ in _TICKS if t > lo), lo * 10)
    return lo, hi


def _chart(title: str, metric: str, scenarios: list[dict[str, Any]]) -> str:
    """One horizontal bar chart (log scale) of `metric` ("rto" or "rpo"): a row per scenario, grouped by
    source, with the source's target as a dashed vertical line across its rows."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for sc in scenarios:
        groups.setdefault(str(sc.get("source", "?")), []).append(sc)
    values = [
        v for sc in scenarios for v in (_num(sc.get(f"{metric}_s")), _num(sc.get(f"{metric}_target_s")))
    ]
    lo, hi = _axis([v for v in values if v is not None])
    span = math.log10(hi) - math.log10(lo)

    def x(v: float) -> float:
        v = min(max(v, lo), hi)
        return _LABEL_W + _PLOT_W * (math.log10(v) - math.log10(lo)) / span

    parts: list[str] = []
    y = 8.0
    for source, rows in groups.items():
        parts.append(
            f'<text x="4" y="{y + 14:.0f}" class="src">{_e(_short(source, 40))}'
            f"<title>{_e(source)}</title></text>"
        )
        y += _HEAD_H
        top = y
        targets = {t for t in (_num(r.get(f"{metric}_target_s")) for r in rows) if t is not None}
        for sc in rows:
            value, target = _num(sc.get(f"{metric}_s")), _num(sc.get(f"{metric}_target_s"))
            label = f"{sc.get('site', '?')} · {sc.get('point', '?')}"
            parts.append(
                f'<text x="14" y="{y + 14:.0f}" class="lbl">{_e(_short(label))}'
                f"<title>{_e(label)}</title></text>"
            )
            if value is None:
                parts.append(f'<text x="{_LABEL_W + 4}" y="{y + 14:.0f}" class="none">not measured</text>')
            else:
                colour = _MISS if target is not None and value > target else _OK
                width = max(x(value) - _LABEL_W, 2.0)
                parts.append(
                    f'<rect x="{_LABEL_W}" y="{y + 3:.0f}" width="{width:.1f}" height="{_ROW_H - 6}" '
                    f'fill="{colour}"><title>{_e(label)}: {_e(duration(value))}</title></rect>'
                )
                parts.append(
                    f'<text x="{_LABEL_W + width + 4:.1f}" y="{y + 14:.0f}" class="val">'
                    f"{_e(duration(value))}</text>"
                )
            y += _ROW_H
        for target in sorted(targets):
            tx = x(target)
            parts.append(
                f'<line x1="{tx:.1f}" y1="{top - 2:.0f}" x2="{tx:.1f}" y2="{y + 2:.0f}" stroke="{_TARGET}" '
                f'stroke-width="2" stroke-dasharray="5,3"><title>{_e(source)} {metric.upper()} target '
                f"{_e(duration(target))}</title></line>"
            )
            parts.append(
                f'<text x="{tx + 3:.1f}" y="{top + 1:.0f}" class="tgt">target {_e(duration(target))}</text>'
            )
        y += 8
    axis_y = y + 4
    grid = [  # drawn first, under the bars
        f'<line x1="{_LABEL_W}" y1="{axis_y:.0f}" x2="{_LABEL_W + _PLOT_W}" y2="{axis_y:.0f}" stroke="#888"/>'
    ]
    for t, name in _TICKS:
        if lo <= t <= hi:
            tx = x(t)
            grid.append(f'<line x1="{tx:.1f}" y1="8" x2="{tx:.1f}" y2="{axis_y:.0f}" class="grid"/>')
            grid.append(f'<text x="{tx:.1f}" y="{axis_y + 16:.0f}" class="tick">{_e(name)}</text>')
    height = axis_y + _AXIS_H
    width = _LABEL_W + _PLOT_W + 90
    return (
        f"<figure><figcaption>{_e(title)}</figcaption>"
        f'<svg role="img" aria-label="{_e(title)}" width="{width}" height="{height:.0f}" '
        f'viewBox="0 0 {width} {height:.0f}">' + "".join(grid + parts) + "</svg></figure>"
    )


# -- the page --------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","Microsoft YaHei",sans-serif;
 margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em;margin:0 0 .3em}h2{font-size:1.15em;margin:1.6em 0 .5em;border-bottom:1px solid #ddd}
.verdict{display:inline-block;font-size:2.4em;font-weight:700;padding:.1em .6em;border-radius:6px;color:#fff}
.pass{background:#1e8449}.fail{background:#c0392b}
.meta td{padding:.1em 1em .1em 0}.meta td:first-child{color:#666}
table.sc{border-collapse:collapse;width:100%;font-size:13px}
table.sc th,table.sc td{border:1px solid #ddd;padding:.3em .45em;vertical-align:top;text-align:left}
table.sc th{background:#f4f4f4}td.num{text-align:right;white-space:nowrap}
td.ok{color:#1e8449;font-weight:600}td.bad{color:#c0392b;font-weight:600}
ul.misses li{color:#c0392b}tr.mine{background:#eaf5ea;font-weight:600}
figure{margin:1em 0}figcaption{font-weight:600;margin-bottom:.3em}
svg text{font-size:12px;fill:#222}svg .src{font-weight:700}svg .tick{text-anchor:middle;fill:#555}
svg .tgt{font-size:11px;fill:#333}svg .none{fill:#c0392b}svg .grid{stroke:#eee}
.note{color:#555;font-size:12.5px}
"""


def _verdict_cell(v: object) -> str:
    cls = "ok" if v == "pass" else "bad"
    return f'<td class="{cls}">{_e(v)}</td>'


def _pair(value: object, target: object, lag: object = None) -> str:
    v, t, lg = _num(value), _num(target), _num(lag)
    text = duration(v)
    if t is not None:
        text += f" / {duration(t)}"
    if lg is not None:
        text += f" (lag {duration(lg)})"
    cls = ' class="num bad"' if v is not None and t is not None and v > t else ' class="num"'
    return f"<td{cls}>{_e(text)}</td>"


def _verified(v: object) -> str:
    if not isinstance(v, dict):
        return "–"
    rows = [f"repository: {_e(v.get('repository'))}", f"source: {_e(v.get('source'))}"]
    for p in v.get("probes") or []:
        if isinstance(p, dict):
            mark = "ok" if p.get("ok") else "FAILED"
            rows.append(
                f"probe {_e(mark)}: <code>{_e(p.get('sql'))}</code> expect {_e(p.get('expect'))}, "
                f"got {_e(p.get('got'))}"
            )
    return "<br>".join(rows)


def _problems(sc: dict[str, Any]) -> str:
    items = [f"<li>{_e(f)}</li>" for f in sc.get("failures") or []]
    for fb in sc.get("fallbacks") or []:
        if isinstance(fb, dict):
            items.append(
                f"<li>fallback from {_e(fb.get('site'))}: {_e(fb.get('key'))}: {_e(fb.get('error'))}</li>"
            )
    return f"<ul>{''.join(items)}</ul>" if items else ""


def _scenario_rows(scenarios: list[dict[str, Any]]) -> str:
    rows = []
    for sc in scenarios:
        nbytes, files = _num(sc.get("bytes")), _num(sc.get("files"))
        rows.append(
            "<tr>"
            + "".join(f"<td>{_e(sc.get(k, '–'))}</td>" for k in ("source", "tenant", "kind", "site", "point"))
            + f"<td>{_e(sc.get('requested') or '–')}</td><td>{_e(sc.get('restored_point') or '–')}</td>"
            + _pair(
                sc.get("rpo_s"),
                sc.get("rpo_target_s"),
                sc.get("lag_s") if sc.get("point") == "latest" else None,
            )
            + _pair(sc.get("rto_s"), sc.get("rto_target_s"))
            + f'<td class="num">{_e(int(files) if files is not None else "–")}</td>'
            + f'<td class="num">{_e(_size(nbytes) if nbytes is not None else "–")}</td>'
            + f"<td>{_verified(sc.get('verified'))}</td>"
            + _verdict_cell(sc.get("verdict"))
            + f"<td>{_problems(sc)}</td></tr>"
        )
    return "".join(rows)


def _level_table(achieved: int) -> str:
    rows = []
    for lv in LEVELS:
        cls = ' class="mine"' if lv.number == achieved else ""
        rto = "no limit" if math.isinf(lv.rto_max_s) else f"≤ {duration(lv.rto_max_s)}"
        rows.append(
            f"<tr{cls}><td>{lv.number}</td><td>{_e(lv.name)} ({_e(lv.name_zh)})</td>"
            f"<td>{_e(lv.annex_rto)}</td><td>{_e(lv.annex_rpo)}</td><td>{_e(rto)}</td>"
            f"<td>≤ {_e(duration(lv.rpo_max_s))}</td></tr>"
        )
    return (
        '<table class="sc"><tr><th>level</th><th>name</th><th>RTO (annex)</th><th>RPO (annex)</th>'
        "<th>RTO bound used</th><th>RPO bound used</th></tr>" + "".join(rows) + "</table>"
    )


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no script, every string escaped)."""
    scenarios = [s for s in report.get("scenarios") or [] if isinstance(s, dict)]
    verdict = "pass" if report.get("verdict") == "pass" else "fail"
    raw_level = report.get("level")
    level: dict[str, Any] = raw_level if isinstance(raw_level, dict) else {}
    number = level.get("gbt20988")
    achieved = number if isinstance(number, int) else 0
    zh = f" ({LEVELS[achieved - 1].name_zh})" if 1 <= achieved <= len(LEVELS) else ""
    started, finished = _parse_time(report.get("started")), _parse_time(report.get("finished"))
    took = duration((finished - started).total_seconds()) if started and finished else "–"
    misses = "".join(f"<li>{_e(m)}</li>" for m in report.get("misses") or [])
    tenant = f"<tr><td>tenant</td><td>{_e(report['tenant'])}</td></tr>" if report.get("tenant") else ""
    overall = report.get("overall")
    overall_row = ""
    if isinstance(overall, dict):
        overall_row = (
            f"<tr><td>whole drill</td><td>{_e(overall.get('verdict'))}, GB/T 20988-2007 level "
            f"{_e(overall.get('gbt20988'))} (this copy holds this tenant's scenarios only)</td></tr>"
        )
    passed = sum(1 for s in scenarios if s.get("verdict") == "pass")
    charts = _chart(
        "RTO achieved per source and site (log scale; dashed: the source's RTO target)", "rto", scenarios
    )
    charts += _chart(
        "RPO achieved per source and site (log scale; dashed: the source's RPO target)", "rpo", scenarios
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>DR drill {_e(report.get("plan", ""))}: {_e(verdict.upper())}</title>
<style>{_CSS}</style></head><body>
<h1>Disaster-recovery drill: {_e(report.get("plan", ""))}</h1>
<p><span class="verdict {verdict}">{_e(verdict.upper())}</span></p>
<table class="meta">
<tr><td>drill id</td><td><code>{_e(report.get("id", ""))}</code></td></tr>{tenant}
<tr><td>started</td><td>{_e(report.get("started", "–"))}</td></tr>
<tr><td>finished</td><td>{_e(report.get("finished", "–"))} (took {_e(took)})</td></tr>
<tr><td>scenarios</td><td>{len(scenarios)}, {passed} passed</td></tr>
<tr><td>GB/T 20988-2007 level</td><td><strong>{_e(achieved)}: {_e(level.get("name", "none"))}{_e(zh)}</strong>
 — {_e(level.get("reason", ""))}</td></tr>{overall_row}
</table>
{f'<h2>Missed</h2><ul class="misses">{misses}</ul>' if misses else ""}
<h2>RTO and RPO against the targets</h2>
{charts}
<h2>Scenarios</h2>
<table class="sc"><tr><th>source</th><th>tenant</th><th>kind</th><th>site</th><th>point</th><th>requested</th>
<th>restored point</th><th>RPO / target (lag)</th><th>RTO / target</th><th>files</th><th>bytes</th>
<th>verified</th><th>verdict</th><th>failures and fallbacks</th></tr>
{_scenario_rows(scenarios)}
</table>
<h2>GB/T 20988-2007 capability levels</h2>
{_level_table(achieved)}
<p class="note">The level is the highest whose bounds every source meets with its worst scenario; it is
consistent with the measured RTO and RPO only. The annex figures are indicative; the bounds drsvc uses
are explained in docs/DRILLS.md. The standard's other elements (backup site, network, equipment, technical
support, operations and maintenance, the disaster-recovery plan) are organisational and not assessed by
drsvc.</p>
</body></html>
"""
