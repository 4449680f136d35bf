"""`drsvc wal-push`'s fast path without a PostgreSQL server: WAL names without `re`, the per-user cache of the
config's answer, and the imports a push costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drsvc.cli import wal_fast
from drsvc.core import layout, pgwal

ROOT = Path(__file__).resolve().parents[1]
_HEXU = "0123456789ABCDEF"


def _names() -> st.SearchStrategy[str]:
    hexu = st.text(_HEXU, min_size=8, max_size=8)
    near = st.text(_HEXU + "abcdefG.", min_size=0, max_size=9)
    return st.one_of(
        st.tuples(hexu, hexu, hexu).map("".join),
        st.tuples(hexu, hexu, hexu).map(lambda t: "".join(t) + ".partial"),
        st.tuples(hexu, hexu, hexu, hexu).map(lambda t: "".join(t[:3]) + "." + t[3] + ".backup"),
        hexu.map(lambda h: h + ".history"),
        st.lists(
            st.one_of(hexu, near, st.sampled_from([".partial", ".backup", ".history", "."])), max_size=5
        ).map("".join),
        st.text(max_size=45),
    )


@given(_names())
def test_wal_names_are_checked_as_the_layout_checks_them(name: str) -> None:
    expected = layout._WAL_NAME.fullmatch(name) is not None
    assert pgwal.is_wal_name(name) is expected
    assert pgwal.is_segment(name) is (expected and len(name) == 24)


def test_parse_segment_rejects_what_is_not_a_segment() -> None:
    with pytest.raises(ValueError, match="not a WAL segment name"):
        pgwal.parse_segment("00000001000000000000000g", 16 << 20)
    assert pgwal.parse_segment("0000000A0000000200000003", 16 << 20) == (10, 2 * 256 + 3)


def _config(tmp_path: Path, state: str, kind: str = "postgres") -> Path:
    path = tmp_path / "drsvc.toml"
    path.write_text(
        f'[state]\ndir = "{state}"\n[sources.pg]\ntype = "{kind}"\n[sources.files]\ntype = "tree"\n'
    )
    return path


def test_the_config_answer_is_cached_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wal_fast, "CACHE_ROOT", str(tmp_path))
    config = _config(tmp_path, "state-a")
    assert wal_fast.incoming_for(str(config), "pg") == str(tmp_path / "state-a" / "incoming" / "wal" / "pg")
    cache = wal_fast._cache_path(str(config))
    assert cache is not None and Path(cache).is_file()
    assert oct(Path(cache).parent.stat().st_mode & 0o777) == "0o700"
    assert wal_fast.incoming_for(str(config), "pg") == str(
        tmp_path / "state-a" / "incoming" / "wal" / "pg"
    )  # from the cache

    config.write_text(config.read_text().replace("state-a", "state-b"))  # edited: the cache is stale
    assert wal_fast.incoming_for(str(config), "pg") == str(tmp_path / "state-b" / "incoming" / "wal" / "pg")
    # a cached config still refuses what the config refuses
    with pytest.raises(pgwal.WalPushError, match="not a postgres source"):
        wal_fast.incoming_for(str(config), "files")
    with pytest.raises(pgwal.WalPushError, match="no source 'nope'"):
        wal_fast.incoming_for(str(config), "nope")
    config.write_text(config.read_text().replace('type = "postgres"', 'type = "log"'))
    with pytest.raises(pgwal.WalPushError, match="not a postgres source"):
        wal_fast.incoming_for(str(config), "pg")


def test_a_source_s_own_incoming_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wal_fast, "CACHE_ROOT", str(tmp_path))
    config = _config(tmp_path, "state")
    config.write_text(
        config.read_text().replace('type = "postgres"', 'type = "postgres"\nincoming = "in/pg"')
    )
    for _ in range(2):  # parsed, then cached
        assert wal_fast.incoming_for(str(config), "pg") == str(tmp_path / "in" / "pg")
    config.write_text(config.read_text().replace('incoming = "in/pg"', "incoming = 5"))
    with pytest.raises(pgwal.WalPushError, match=r"sources\.pg\.incoming"):
        wal_fast.incoming_for(str(config), "pg")


def test_a_cache_directory_others_can_write_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wal_fast, "CACHE_ROOT", str(tmp_path))
    d = tmp_path / f"drsvc-{os.geteuid()}"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    config = _config(tmp_path, "state-a")
    assert wal_fast._cache_path(str(config)) is None
    # planted answer: ignored, the config decides
    name = str(config.resolve()).replace("%", "%25").replace("/", "%")
    st_ = config.stat()
    stamp = f"{st_.st_dev} {st_.st_ino} {st_.st_size} {st_.st_mtime_ns} {st_.st_ctime_ns}"
    (d / name).write_text(f"{stamp}\npg\t/evil\n")
    assert wal_fast.incoming_for(str(config), "pg") == str(tmp_path / "state-a" / "incoming" / "wal" / "pg")
    d.chmod(0o700)
    assert (
        wal_fast.incoming_for(str(config), "pg") == "/evil"
    )  # the same file, trusted once the dir is private
    (d / name).unlink()
    (d / name).symlink_to(tmp_path / "elsewhere")  # a symlink is never followed
    assert wal_fast.incoming_for(str(config), "pg") == str(tmp_path / "state-a" / "incoming" / "wal" / "pg")


def test_a_push_imports_neither_typing_nor_re_nor_the_toml_parser(tmp_path: Path) -> None:
    """What a push costs in imports is what makes it fast (benchmarks/wal.py): run it as a console script
    would, without `site`, and list the modules a regression would bring back."""
    from test_postgres import fake_segment, seg

    config = _config(tmp_path, "state")
    (tmp_path / seg(1)).write_bytes(fake_segment())
    (tmp_path / seg(2)).write_bytes(fake_segment())
    code = (
        "import sys; sys.path[:0] = [{root!r}];"
        "from drsvc.cli.main import main; rc = main(['-c', {config!r}, 'wal-push', 'pg', {path!r}]);"
        "loaded = sorted(m for m in {heavy!r} if m in sys.modules);"
        "import json; print(json.dumps([rc, loaded]))"
    )
    heavy = ["typing", "re", "pathlib", "uuid", "tomllib", "asyncio", "argparse", "hashlib", "pydantic"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}

    def push(n: int) -> list[object]:
        c = code.format(root=str(ROOT), config=str(config), path=str(tmp_path / seg(n)), heavy=heavy)
        r = subprocess.run(
            [sys.executable, "-S", "-c", c], capture_output=True, text=True, env=env, timeout=60
        )
        assert r.returncode == 0, r.stderr
        out: list[object] = json.loads(r.stdout)
        return out

    assert push(1)[0] == 0  # the first push parses the config (and caches the answer)
    assert push(2) == [0, []]
    assert (tmp_path / "state" / "incoming" / "wal" / "pg" / seg(2)).read_bytes() == fake_segment()
