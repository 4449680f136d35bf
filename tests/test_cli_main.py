"""drsvc.cli.main: a command imports only its own verb's module."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from drsvc.cli.main import VERB_MODULES, build_parser, verb_of


@pytest.mark.parametrize(
    ("argv", "verb"),
    [
        (["snapshot", "docs"], "snapshot"),
        (["-c", "x.toml", "restore", "docs"], "restore"),
        (["--config", "x.toml", "ls"], "ls"),
        (["--config=x.toml", "run"], "run"),
        (["-cx.toml", "prune"], "prune"),
        (["--help"], None),
        (["-c", "x.toml"], None),
        ([], None),
    ],
)
def test_verb_of(argv: list[str], verb: str | None) -> None:
    assert verb_of(argv) == verb


def test_a_short_command_loads_neither_the_daemon_nor_the_drill_machinery() -> None:
    code = (
        "import sys; from drsvc.cli.main import build_parser;"
        "a = build_parser(['snapshot', 'docs']).parse_args(['snapshot', 'docs']);"
        "heavy = ['aiohttp', 'rich', 'numpy', 'drsvc.supervisor', 'drsvc.drill', 'drsvc.api', 'minio'];"
        "loaded = [m for m in heavy if m in sys.modules and type(sys.modules[m]).__name__ == 'module'];"
        "import json; print(json.dumps([a.verb, loaded]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["snapshot", []]


def test_help_and_unknown_verbs_still_list_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(["bogus"]).parse_args(["bogus"])
    message = capsys.readouterr().err
    assert all(f"'{v}'" in message for v in VERB_MODULES)
