"""The TOML configuration: valid files load into typed objects, invalid ones fail naming the key."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from drsvc.core.config import Config, S3SiteConfig, Secret, load_config, parse_config, parse_size
from drsvc.core.errors import ConfigError

GOOD_TOML = """
[state]
dir = "state"
spool_quota = "2GiB"

[tenants.hr]
suite = "sm4-gcm"
pack_size = "16MiB"
key = { passphrase = { file = "secrets/hr.pass" } }

[tenants.hr.chunker]
min_size = "8KiB"
avg_size = 32768
max_size = "128KiB"

[tenants.finance]
key = { keyfile = "secrets/finance.key" }

[sites.jinan-dr]
type = "local"
path = "/srv/dr/jinan"

[sites.qingdao-dr]
type = "s3"
endpoint = "qingdao.example:9000"
bucket = "drsvc"
prefix = "prod"
access_key = { env = "QD_ACCESS" }
secret_key = { file = "/etc/drsvc/qd.secret" }

[sources.hr-files]
tenant = "hr"
type = "tree"
path = "/data/hr"
sites = ["jinan-dr", "qingdao-dr"]
min_copies = 2
exclude = ["*.tmp", "cache/*"]

[sources.ledger]
tenant = "finance"
type = "tree"
path = "/data/ledger"
sites = ["qingdao-dr"]
"""


def base() -> dict[str, Any]:
    return {
        "state": {"dir": "/var/lib/drsvc"},
        "tenants": {"hr": {"key": {"passphrase": {"value": "pw"}}}},
        "sites": {
            "a": {"type": "local", "path": "/srv/a"},
            "b": {
                "type": "s3",
                "endpoint": "b.example:9000",
                "bucket": "drsvc",
                "access_key": {"value": "ak"},
                "secret_key": {"value": "sk"},
            },
        },
        "sources": {
            "x": {"tenant": "hr", "type": "tree", "path": "/data", "sites": ["a", "b"], "min_copies": 2}
        },
    }


def test_load_config(tmp_path: Path) -> None:
    path = tmp_path / "drsvc.toml"
    path.write_text(GOOD_TOML)
    cfg = load_config(path)
    assert cfg.path == path
    assert cfg.state.dir == tmp_path / "state"  # relative paths are relative to the config file
    assert cfg.state.spool_quota == 2 * 1024**3
    hr = cfg.tenants["hr"]
    assert (hr.suite, hr.pack_size) == ("sm4-gcm", 16 * 1024**2)
    assert (hr.chunker.min_size, hr.chunker.avg_size, hr.chunker.max_size) == (8192, 32768, 128 * 1024)
    assert hr.key.passphrase is not None and hr.key.passphrase.file == tmp_path / "secrets/hr.pass"
    assert cfg.tenants["finance"].key.keyfile == tmp_path / "secrets/finance.key"
    assert cfg.tenants["finance"].suite == "aes-256-gcm"
    qd = cfg.sites["qingdao-dr"]
    assert isinstance(qd, S3SiteConfig) and qd.secure and qd.prefix == "prod"
    assert qd.secret_key.file == Path("/etc/drsvc/qd.secret")
    src = cfg.source("hr-files")
    assert src.sites == ("jinan-dr", "qingdao-dr") and src.min_copies == 2
    assert cfg.sources["ledger"].min_copies == 1
    assert cfg.tenant_sites("hr") == ["jinan-dr", "qingdao-dr"]
    assert cfg.tenant_sites("finance") == ["qingdao-dr"]
    assert cfg.tenant_sites("nobody") == []


def test_config_is_frozen() -> None:
    cfg = parse_config(base())
    with pytest.raises(ValueError):
        cfg.sources["x"].min_copies = 1  # type: ignore[misc]


def _set(*path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value

    return change


def _drop(*path: str) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        for p in path[:-1]:
            d = d[p]
        del d[path[-1]]

    return change


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        (_set("sources", "x", "min_copies", value=3), "sources.x.min_copies", "only 2 sites"),
        (_set("sources", "x", "min_copies", value=0), "sources.x.min_copies", "greater than"),
        (_set("sources", "x", "tenant", value="nope"), "sources.x.tenant", "unknown tenant 'nope'"),
        (_set("sources", "x", "sites", value=["a", "zz"]), "sources.x.sites", "unknown site 'zz'"),
        (_set("sources", "x", "sites", value=["a", "a"]), "sources.x.sites", "twice"),
        (_set("sources", "x", "sites", value=[]), "sources.x.sites", "at least 1"),
        (_set("sources", "x", "type", value="ftp"), "sources.x.type", "tree"),
        (_set("sources", "x", "page_chunk", value="lots"), "sources.x.page_chunk", "not a size"),
        (_set("sources", "x", "page_chunk", value="1KiB"), "sources.x.page_chunk", "greater than"),
        (_set("sites", "b", "endpoint", value="http://b:9000"), "sites.b.endpoint", "host:port"),
        (_set("sites", "b", "endpoint", value="b:9000/path"), "sites.b.endpoint", "host:port"),
        (_set("sites", "b", "concurrency", value=0), "sites.b.concurrency", "greater than"),
        (_set("sites", "b", "timeout", value=0), "sites.b.timeout", "greater than"),
        (_set("sites", "b", "bogus", value=1), "sites.b.bogus", "Extra inputs"),
        (_set("sites", "b", "type", value="ftp"), "sites.b", "'local', 's3'"),
        (_drop("sites", "b", "type"), "sites.b", "discriminator"),
        (_drop("sites", "b", "endpoint"), "sites.b.endpoint", "required"),
        (
            _set("sites", "b", "access_key", value={"value": "a", "env": "B"}),
            "sites.b.access_key",
            "exactly one",
        ),
        (_set("sites", "b", "secret_key", value={}), "sites.b.secret_key", "exactly one"),
        (_set("sites", "a", "path", value=5), "sites.a.path", "path"),
        (_set("sites", "Bad", value={"type": "local", "path": "/x"}), "sites.Bad", "pattern"),
        (_set("tenants", "hr", "suite", value="des"), "tenants.hr.suite", "sm4-gcm"),
        (_set("tenants", "hr", "key", value={}), "tenants.hr.key", "exactly one"),
        (_set("tenants", "hr", "pack_size", value="8 XB"), "tenants.hr.pack_size", "not a size"),
        (_set("tenants", "hr", "pack_size", value=1.5), "tenants.hr.pack_size", "not a size"),
        (_set("tenants", "hr", "pack_size", value=-1), "tenants.hr.pack_size", "greater than"),
        (_set("tenants", "hr", "compression_level", value=20), "tenants.hr.compression_level", "less than"),
        (
            _set("tenants", "hr", "chunker", value={"min_size": 100, "avg_size": 50}),
            "tenants.hr.chunker",
            "64",
        ),
        (_set("tenants", "Bad Name", value={"key": {"keyfile": "/k"}}), "tenants.Bad Name", "pattern"),
        (_set("state", "spool_quota", value="lots"), "state.spool_quota", "not a size"),
        (_drop("state", "dir"), "state.dir", "required"),
        (_drop("state"), "state", "required"),
        (_set("surprise", value=1), "surprise", "Extra inputs"),
        (_set("restore", value={"roots": ["rel/dir"]}), "restore.roots", "not an absolute path"),
        (_set("audit", value={"keep": "30d"}), "audit.keep", "at least 180 days"),
        (_set("audit", value={"tenant": "nope"}), "audit.tenant", "unknown tenant 'nope'"),
        (_set("audit", value={"hash": "md5"}), "audit.hash", "sm3"),
        (_set("api", value={"tls_cert": "/c.pem"}), "api.tls_key", "both or neither"),
        (_set("api", value={"max_restores": 0}), "api.max_restores", "greater than"),
        (
            _set("api", value={"tokens": {"ann": {"hash": "sha256:" + "0" * 64, "role": "root"}}}),
            "api.tokens.ann.role",
            "viewer",
        ),
        (
            _set("api", value={"tokens": {"ann": {"hash": "plain", "role": "viewer"}}}),
            "api.tokens.ann.hash",
            "pattern",
        ),
        (
            _set(
                "api",
                value={"tokens": {"ann": {"hash": "sha256:" + "0" * 64, "role": "viewer", "tenants": ["x"]}}},
            ),
            "api.tokens.ann.tenants",
            "unknown tenant 'x'",
        ),
        (  # a token's scope is never implied
            _set(
                "api",
                value={"tokens": {"ann": {"hash": "sha256:" + "0" * 64, "role": "viewer"}}},
            ),
            "api.tokens.ann.tenants",
            'or ["*"] for every tenant',
        ),
        (
            _set(
                "api",
                value={"tokens": {"ann": {"hash": "sha256:" + "0" * 64, "role": "viewer", "tenants": []}}},
            ),
            "api.tokens.ann.tenants",
            "must name the tenants",
        ),
        (  # an API with tokens needs its audit log replicated
            _set(
                "api",
                value={"tokens": {"ann": {"hash": "sha256:" + "0" * 64, "role": "viewer", "tenants": ["*"]}}},
            ),
            "audit.tenant",
            "must be replicated",
        ),
        (_set("api", value={"tokens_file": "/etc/drsvc/tokens.toml"}), "audit.tenant", "[audit] tenant"),
    ],
)
def test_errors_name_the_key(change: Callable[[dict[str, Any]], None], key: str, message: str) -> None:
    data = base()
    change(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.fields["key"].startswith(key), info.value.fields
    assert message in info.value.message
    assert "drsvc config check" in info.value.hint


def test_an_api_with_an_explicit_scope_and_a_replicated_audit_log() -> None:
    data = base()
    data["api"] = {
        "tokens": {
            "ann": {"hash": "sha256:" + "0" * 64, "role": "viewer", "tenants": ["hr"]},
            "bob": {"hash": "sha256:" + "1" * 64, "role": "admin", "tenants": ["*"]},
        }
    }
    data["audit"] = {"tenant": "hr"}
    cfg = parse_config(data)
    assert cfg.api.tokens["ann"].tenants == ("hr",) and cfg.api.tokens["bob"].tenants == ("*",)
    assert parse_config(base()).audit.tenant is None  # no API tokens: no audit tenant needed


@pytest.mark.parametrize("name", ["local", "s3"])
def test_site_named_like_a_site_type(name: str) -> None:
    """A site may be called "local" or "s3": its name stays in the key of an error."""
    data = base()
    data["sites"] = {name: {"type": name, "path": 5} if name == "local" else {**base()["sites"]["b"]}}
    if name == "s3":
        data["sites"][name]["endpoint"] = "https://x"
    data["sources"]["x"].update(sites=[name], min_copies=1)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.fields["key"] == f"sites.{name}." + ("path" if name == "local" else "endpoint")


def test_error_counts_further_problems() -> None:
    data = base()
    data["sites"]["b"]["concurrency"] = 0
    data["sites"]["b"]["timeout"] = -1
    with pytest.raises(ConfigError, match="and 1 more problem"):
        parse_config(data)


def test_unknown_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(base()).source("nope")
    assert info.value.fields["key"] == "sources" and "configured: x" in info.value.message


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert info.value.fields["key"].endswith("missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[state\ndir = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(binary)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(GOOD_TOML.replace("min_copies = 2", "min_copies = 5"))
    with pytest.raises(ConfigError) as info:
        load_config(wrong)
    assert info.value.fields["key"] == "sources.hr-files.min_copies"


# ---- sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1048576", 1048576),
        ("8MiB", 8 * 1024**2),
        ("8mib", 8 * 1024**2),
        (" 8 MiB ", 8 * 1024**2),
        ("500MB", 500 * 1000**2),
        ("500M", 500 * 1000**2),
        ("4k", 4000),
        ("4KiB", 4096),
        ("1.5GiB", 1536 * 1024**2),
        ("2TB", 2 * 1000**4),
        ("1TiB", 1024**4),
        ("10B", 10),
        (12345, 12345),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "MiB", "8 XB", "8 MiBs", "-1", "eight", "8 i", "1e3", "8MiB8", 1.5, None, True]
)
def test_parse_size_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@given(n=st.integers(0, 2**20), unit=st.sampled_from(["", "B", "KiB", "MiB", "GiB", "KB", "MB", "GB", "kib"]))
def test_parse_size_units(n: int, unit: str) -> None:
    factor = {
        "": 1,
        "b": 1,
        "kib": 1024,
        "mib": 1024**2,
        "gib": 1024**3,
        "kb": 1000,
        "mb": 1000**2,
        "gb": 1000**3,
    }
    assert parse_size(f"{n}{unit}") == n * factor[unit.lower()]
    assert parse_size(f"{n} {unit}") == n * factor[unit.lower()]


def test_sizes_parse_in_every_size_field() -> None:
    data = base()
    data["tenants"]["hr"].update(
        pack_size="4MiB", chunker={"min_size": "1KiB", "avg_size": "4KiB", "max_size": "1MB"}
    )
    data["sources"]["x"]["page_chunk"] = "16KiB"
    data["state"]["spool_quota"] = "1.5 GiB"
    cfg = parse_config(data)
    chunker = cfg.tenants["hr"].chunker
    assert (cfg.tenants["hr"].pack_size, chunker.min_size, chunker.avg_size, chunker.max_size) == (
        4 * 1024**2,
        1024,
        4096,
        1000**2,
    )
    assert cfg.sources["x"].page_chunk == 16384 and cfg.state.spool_quota == 1536 * 1024**2


# ---- secrets and key material ---------------------------------------------------------------------


def test_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "secret"
    f.write_bytes(b"first line\nsecond line\n")
    assert Secret(file=f).read_text("k") == "first line"
    assert Secret(file=f).read_bytes("k") == b"first line\nsecond line\n"
    monkeypatch.setenv("DRSVC_TEST_SECRET", "from env")
    assert Secret(env="DRSVC_TEST_SECRET").read_text("k") == "from env"
    assert Secret(value="inline").read_bytes("k") == b"inline"
    monkeypatch.delenv("DRSVC_TEST_SECRET")
    with pytest.raises(ConfigError) as info:
        Secret(env="DRSVC_TEST_SECRET").read_bytes("sites.b.secret_key")
    assert info.value.fields["key"] == "sites.b.secret_key"
    with pytest.raises(ConfigError) as info:
        Secret(file=tmp_path / "nope").read_bytes("sites.b.access_key")
    assert info.value.fields["key"] == "sites.b.access_key"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert Secret(file=empty).read_text("k") == ""


def test_key_material(tmp_path: Path) -> None:
    keyfile = tmp_path / "hr.key"
    keyfile.write_bytes(b"\x00\x01binary key\n")
    data = base()
    data["tenants"]["hr"]["key"] = {"keyfile": "hr.key"}
    cfg = parse_config(copy.deepcopy(data), base=tmp_path)
    assert cfg.tenants["hr"].key.material("hr") == ("keyfile", b"\x00\x01binary key\n")
    cfg = parse_config(base())
    assert cfg.tenants["hr"].key.material("hr") == ("passphrase", b"pw")
    keyfile.unlink()
    cfg = parse_config(data, base=tmp_path)
    with pytest.raises(ConfigError) as info:
        cfg.tenants["hr"].key.material("hr")
    assert info.value.fields["key"] == "tenants.hr.key.keyfile"


def test_source_patterns() -> None:
    data = base()
    data["sources"]["x"]["exclude"] = ["*.tmp", "cache/*", "node_modules"]
    src = parse_config(data).sources["x"]
    assert src.is_excluded("a/b/c.tmp") and src.is_excluded("cache/x") and src.is_excluded("a/node_modules")
    assert not src.is_excluded("a/b/c.txt") and not src.is_excluded("a/cache.d")
    assert (
        src.is_page_file("db/main.sqlite3") and src.is_page_file("x.ibd") and not src.is_page_file("x.db-wal")
    )


def test_model_is_the_config_type() -> None:
    assert isinstance(parse_config(base()), Config)


def test_inline_secrets_are_named_so_config_check_can_warn(tmp_path: Path) -> None:
    from drsvc.cli.main import main

    cfg = tmp_path / "c.toml"
    (tmp_path / "pw").write_text("from a file\n")
    cfg.write_text(
        f'[state]\ndir = "{tmp_path}/s"\n'
        '[tenants.a.key.passphrase]\nvalue = "inline"\n'
        '[tenants.b.key.passphrase]\nfile = "pw"\n'
        '[sites.x]\ntype = "s3"\nendpoint = "h:1"\nbucket = "bkt"\n'
        'access_key = { env = "AK" }\nsecret_key = { value = "inline" }\n'
        "[sources]\n"
    )
    from drsvc.core.config import load_config

    assert load_config(cfg).inline_secrets() == ["tenants.a.key.passphrase", "sites.x.secret_key"]
    assert main(["-c", str(cfg), "config", "check"]) == 0


def test_schedule_interval_calendar_and_both() -> None:
    import datetime

    from drsvc.core.config import SourceConfig

    def src(**kw: object) -> SourceConfig:
        return SourceConfig.model_validate(
            {"tenant": "t", "type": "tree", "path": "/x", "sites": ["a"], **kw}
        )

    noon = datetime.datetime(2026, 11, 25, 12, 0).astimezone().timestamp()
    assert src().next_due(noon) == noon + 3600  # the default: hourly
    assert src(interval="15m").next_due(noon) == noon + 900
    daily = src(at=["02:00", "14:30"])
    assert daily.next_due(noon) == noon + 2.5 * 3600  # 14:30 today
    after = noon + 3 * 3600  # 15:00: next is 02:00 tomorrow
    assert daily.next_due(after) == datetime.datetime(2026, 11, 26, 2, 0).astimezone().timestamp()
    both = src(interval="1h", at=["12:30"])
    assert both.next_due(noon) == noon + 1800  # whichever comes first
    for bad in (["2:00"], ["24:00"], ["12:60"], ["noon"]):
        with pytest.raises(ValidationError):
            src(at=bad)


def test_restore_roots_confine_targets(tmp_path: Path) -> None:
    root = tmp_path / "roots" / "r"
    root.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    cfg = parse_config({**base(), "restore": {"roots": [str(root)]}})
    assert cfg.restore.check_target(root / "new" / "dir") == root / "new" / "dir"
    assert cfg.restore.check_target(root) == root
    for bad in (tmp_path / "elsewhere", root / ".." / "x", root / "escape" / "t", tmp_path / "roots" / "rx"):
        with pytest.raises(ConfigError, match="outside the restore roots") as exc:
            cfg.restore.check_target(bad)
        assert exc.value.fields["key"] == "restore.roots"
    # no roots: anywhere (the CLI's default), made absolute
    assert parse_config(base()).restore.check_target(tmp_path / "a" / ".." / "b") == tmp_path / "b"
