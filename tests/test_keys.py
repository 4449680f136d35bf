"""Key slots: add, list, remove (never the last), change a passphrase, crypto-shred."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import PASSPHRASE, init_app, local_sites, make_config, tree_state

from drsvc.app import App
from drsvc.core.crypto import ScryptParams
from drsvc.core.errors import ObjectLocked, WrongKeyError
from drsvc.core.stores.faults import Fault, FaultyStore
from drsvc.keys import KeyManager, KeySlotError, generate_keyfile

FAST = ScryptParams(n=2**10)


def _keyfile_config(tmp: Path, src: Path, keyfile: Path) -> object:
    cfg = make_config(tmp, src, local_sites(tmp, ["a", "b"]))
    tenant = cfg.tenants["fin"].model_copy(
        update={"key": cfg.tenants["fin"].key.model_copy(update={"passphrase": None, "keyfile": keyfile})}
    )
    return cfg.model_copy(update={"tenants": {"fin": tenant}})


async def test_add_a_keyfile_slot_then_remove_the_passphrase(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.txt").write_text("payload\n")
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a", "b"])))
    keyfile = tmp_path / "fin.key"
    generate_keyfile(str(keyfile))
    assert keyfile.stat().st_mode & 0o777 == 0o600
    try:
        await app.snapshot("docs")
        km = KeyManager(app, "fin")
        first = await km.list()
        assert len(first) == 1 and first[0].opens_configured_key and first[0].sites == ["a", "b"]
        added = await km.add("keyfile", keyfile.read_bytes())
        slots = {s.id: s for s in await km.list()}
        assert set(slots) == {first[0].id, added} and slots[added].kind == "keyfile"
        await km.remove(first[0].id)  # the passphrase no longer opens anything
        with pytest.raises(KeySlotError, match="last key slot"):
            await km.remove(added)
    finally:
        await app.close()
    with_passphrase = App(make_config(tmp_path, src, local_sites(tmp_path, ["a", "b"])))
    try:
        with pytest.raises(WrongKeyError):
            await with_passphrase.open_repo("fin")
    finally:
        await with_passphrase.close()
    with_keyfile = App(_keyfile_config(tmp_path, src, keyfile))  # type: ignore[arg-type]
    try:
        await with_keyfile.restore("docs", tmp_path / "out", None, site="b")
    finally:
        await with_keyfile.close()
    assert tree_state(tmp_path / "out") == tree_state(src)


async def test_passwd_replaces_the_configured_passphrase(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])))
    try:
        old, new = await KeyManager(app, "fin").passwd(b"a brand new passphrase", FAST)
        assert old != new
    finally:
        await app.close()
    for phrase, opens in ((PASSPHRASE, False), ("a brand new passphrase", True)):
        a = App(make_config(tmp_path, src, local_sites(tmp_path, ["a"]), passphrase=phrase))
        try:
            if opens:
                await a.open_repo("fin")
            else:
                with pytest.raises(WrongKeyError):
                    await a.open_repo("fin")
        finally:
            await a.close()


async def test_shred_needs_the_name_and_then_nothing_restores(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "secret.txt").write_text("end of contract\n")
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a", "b"])))
    try:
        await app.snapshot("docs")
        km = KeyManager(app, "fin")
        await km.add("passphrase", b"second key", FAST)
        with pytest.raises(KeySlotError, match="confirmation"):
            await km.shred("not-the-tenant")
        assert len(await km.list()) == 2  # nothing happened
        assert await km.shred("fin") == 4  # two slots on two sites
    finally:
        await app.close()
    for phrase in (PASSPHRASE, "second key"):
        a = App(make_config(tmp_path, src, local_sites(tmp_path, ["a", "b"]), passphrase=phrase))
        try:
            with pytest.raises(WrongKeyError, match="no key slots"):
                await a.restore("docs", tmp_path / "out", None)
        finally:
            await a.close()
    assert not (tmp_path / "out").exists()
    # the sealed data is still at the sites, but no key in the world opens it
    assert any((tmp_path / "sites" / "a" / "fin" / "data").rglob("*"))


async def test_key_changes_need_every_site(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a", "b"])))
    try:
        import shutil

        shutil.rmtree(tmp_path / "sites" / "b")  # site b lost its copy (or is unreachable)
        with pytest.raises(KeySlotError, match="site b cannot be read"):
            await KeyManager(app, "fin").add("passphrase", b"another", FAST)
        slots_at_a = list((tmp_path / "sites" / "a" / "fin" / "keys").iterdir())
        assert len(slots_at_a) == 1  # nothing was written anywhere
    finally:
        await app.close()


async def test_shred_on_a_locked_site_shreds_the_others_and_says_what_is_left(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a", "b"])))
    try:
        healthy = app.store("b")
        until = "2099-01-01T00:00:00+00:00"
        locked = ObjectLocked("object is locked", site="b", key="?", until=until)
        app._stores["b"] = FaultyStore(
            healthy, [Fault("delete", key_contains="/keys/", error=locked, times=-1)]
        )
        km = KeyManager(app, "fin")
        with pytest.raises(KeySlotError, match=re.escape(f"b until {until}")) as exc:
            await km.shred("fin")
        assert "again after that date" in (exc.value.hint or "")
        assert not list((tmp_path / "sites" / "a" / "fin" / "keys").iterdir())  # a is shredded
        assert list((tmp_path / "sites" / "b" / "fin" / "keys").iterdir())  # b keeps its slot, for now
        app._stores["b"] = healthy  # the retention has ended
        assert await KeyManager(app, "fin").shred("fin") == 1
    finally:
        await app.close()
