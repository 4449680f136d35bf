"""The files in deploy/: the example config and drill plan load, and the systemd units say what the daemon and
the drill rely on."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from drsvc.core.config import load_config, parse_duration
from drsvc.drill.plan import load_plan

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
EXAMPLE = DEPLOY / "drsvc.toml.example"
UNIT = DEPLOY / "drsvc.service"
DRILL_UNIT = DEPLOY / "drsvc-drill.service"
DRILL_TIMER = DEPLOY / "drsvc-drill.timer"
DRILL_PLAN = DEPLOY / "drill-plan.example.toml"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values in order]}}: keys may repeat, '\\' continues a line."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"line {number} is not KEY=value in a section: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    assert not pending, "the unit ends in a continuation line"
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values, f"{key}= is not set"
    return values[-1]  # the last assignment wins


def seconds(value: str) -> float:
    """A systemd time span as the units write it here: '60', '60s', '1min', '5s', '3h', '1d'."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m|h|d)?", value)
    assert m, f"time span {value!r} not understood by this test"
    unit = {"min": 60.0, "m": 60.0, "h": 3600.0, "d": 86400.0}.get(m.group(2) or "s", 1.0)
    return float(m.group(1)) * unit


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    unit = parse_unit(UNIT.read_text())
    assert {"Unit", "Service", "Install"} <= set(unit)
    return unit["Service"]


def test_the_example_config_loads_as_it_is() -> None:
    # secrets named by file or env are read only when used, so their absence here does not matter
    cfg = load_config(EXAMPLE)
    assert set(cfg.tenants) == {"hr", "urban-planning"}
    assert set(cfg.sites) == {"jinan-dr", "qingdao-dr", "offsite"}
    assert cfg.daemon.listen == "127.0.0.1:8080"
    assert cfg.daemon.drain_timeout == 20.0 and cfg.daemon.tick == 1.0
    hr = cfg.sources["hr-docs"]
    assert (hr.interval, hr.rpo_target, hr.rto_target) == (900.0, 3600.0, 4 * 3600.0)
    assert cfg.sources["planning-gis"].interval == 6 * 3600.0
    assert str(cfg.state.dir) == "/var/lib/drsvc"


def test_the_unit_is_a_notify_service_with_watchdog_and_reload(service: dict[str, list[str]]) -> None:
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert seconds(one(service, "WatchdogSec")) > 0
    reload = one(service, "ExecReload")
    assert "-HUP" in reload and "$MAINPID" in reload
    start = one(service, "ExecStart")
    assert start.split()[0] == "/opt/drsvc/.venv/bin/drsvc" and start.split()[-1] == "run"
    assert one(service, "Restart") == "on-failure"
    assert (one(service, "User"), one(service, "Group")) == ("drsvc", "drsvc")
    assert one(service, "StateDirectory") == "drsvc"  # /var/lib/drsvc, the example's [state] dir


def test_the_stop_timeout_leaves_room_for_the_drain(service: dict[str, list[str]]) -> None:
    stop = seconds(one(service, "TimeoutStopSec"))
    drain = load_config(EXAMPLE).daemon.drain_timeout
    assert stop > drain, f"TimeoutStopSec={stop} must exceed daemon.drain_timeout={drain}"
    assert stop > parse_duration("20s")  # the config's default drain_timeout too
    # SIGTERM to the main process only: the drain may need the worker processes
    assert one(service, "KillMode") == "mixed"


def test_the_unit_is_sandboxed(service: dict[str, list[str]]) -> None:
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
    }.items():
        assert one(service, key) == value, key
    assert set(one(service, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert one(service, "CapabilityBoundingSet") == "CAP_DAC_READ_SEARCH"
    assert one(service, "AmbientCapabilities") == "CAP_DAC_READ_SEARCH"
    assert one(service, "LimitNOFILE") == "65536"
    assert "PYTHONUNBUFFERED=1" in service["Environment"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed on this machine (Debian: apt-get install systemd)")
    # verify checks that ExecStart's binary exists: point it at one that does
    text = UNIT.read_text().replace("/opt/drsvc/.venv/bin/drsvc", sys.executable)
    assert sys.executable in text
    copy = tmp_path / "drsvc.service"
    copy.write_text(text)
    done = subprocess.run(
        [tool, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # unknown keys and unparsable values are only warnings ("..., ignoring"): none may concern this unit
    mine = [line for line in output.splitlines() if "drsvc.service" in line]
    assert not mine, "\n".join(mine)


# -- the drill ---------------------------------------------------------------------------------------------

# the daemon's sandbox and privileges, which the drill's unit must repeat exactly
SHARED = (
    "User",
    "Group",
    "UMask",
    "StateDirectory",
    "StateDirectoryMode",
    "CapabilityBoundingSet",
    "AmbientCapabilities",
    "NoNewPrivileges",
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectClock",
    "ProtectHostname",
    "ProtectProc",
    "PrivateMounts",
    "RemoveIPC",
    "RestrictAddressFamilies",
    "RestrictNamespaces",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "SystemCallArchitectures",
    "SystemCallFilter",
    "SystemCallErrorNumber",
    "EnvironmentFile",
    "LimitNOFILE",
)


def test_the_drill_unit_is_a_oneshot_with_the_daemons_sandbox(service: dict[str, list[str]]) -> None:
    unit = parse_unit(DRILL_UNIT.read_text())
    assert {"Unit", "Service"} <= set(unit) and "Install" not in unit  # started by the timer only
    drill = unit["Service"]
    assert one(drill, "Type") == "oneshot"
    start = one(drill, "ExecStart").split()
    assert start[0] == "/opt/drsvc/.venv/bin/drsvc"
    assert start[1:] == ["-c", "/etc/drsvc/drsvc.toml", "drill", "--plan", "/etc/drsvc/drill-plan.toml"]
    # a failed drill must show as a failed unit: no restart loop, no exit status counted as success
    assert "Restart" not in drill and "SuccessExitStatus" not in drill
    assert 3600 <= seconds(one(drill, "TimeoutStartSec")) <= 7 * 86400
    for key in SHARED:
        assert drill.get(key) == service.get(key), key
    assert "PYTHONUNBUFFERED=1" in drill["Environment"]


def test_the_drill_timer_runs_monthly_and_catches_up() -> None:
    unit = parse_unit(DRILL_TIMER.read_text())
    timer = unit["Timer"]
    assert one(timer, "Unit") == "drsvc-drill.service"
    assert one(timer, "Persistent") == "true"
    assert 0 < seconds(one(timer, "RandomizedDelaySec")) <= 12 * 3600
    assert one(unit["Install"], "WantedBy") == "timers.target"
    calendar = one(timer, "OnCalendar")
    assert calendar == "monthly" or re.fullmatch(r"\*-\*-01 \d\d:\d\d(:\d\d)?", calendar), calendar
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return
    done = subprocess.run(
        [tool, "calendar", "--iterations=3", calendar], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    elapses = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4})-(\d\d)-(\d\d)", done.stdout)
    assert len(elapses) == 3 and {day for _, _, day in elapses} == {"01"}, done.stdout
    months = [int(y) * 12 + int(m) for y, m, _ in elapses]
    assert [b - a for a, b in itertools.pairwise(months)] == [1, 1]


def test_the_example_plan_loads_against_the_example_config() -> None:
    cfg = load_config(EXAMPLE)
    plan = load_plan(DRILL_PLAN, cfg)  # ConfigError naming the key if the plan or a name in it is wrong
    assert plan.name == "monthly"
    assert {sp.kind for sp in plan.sources} == {"tree", "log", "postgres"}  # one example of each
    for sp in plan.sources:
        assert set(sp.sites) <= set(cfg.sources[sp.source].sites)
        assert sp.rto_target_s and sp.rpo_target_s  # every scenario is judged against targets
    assert any(sp.probes for sp in plan.sources if sp.kind == "postgres")
    # the raw file: every [[sources]] lists its points, as the comments explain
    raw = tomllib.loads(DRILL_PLAN.read_text())
    assert all(entry["points"] for entry in raw["sources"])


def test_systemd_analyze_verify_accepts_the_drill_units(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed on this machine (Debian: apt-get install systemd)")
    text = DRILL_UNIT.read_text().replace("/opt/drsvc/.venv/bin/drsvc", sys.executable)
    assert sys.executable in text
    (tmp_path / "drsvc-drill.service").write_text(text)
    (tmp_path / "drsvc-drill.timer").write_text(DRILL_TIMER.read_text())
    done = subprocess.run(
        [
            tool,
            "verify",
            "--man=no",
            str(tmp_path / "drsvc-drill.timer"),
            str(tmp_path / "drsvc-drill.service"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    mine = [line for line in output.splitlines() if "drsvc-drill" in line]
    assert not mine, "\n".join(mine)
