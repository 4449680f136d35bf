"""Key slots of a tenant repository: list, add, remove, change a passphrase, crypto-shred.

1. The master key never changes: a slot wraps it under a passphrase (scrypt) or a key file; adding a slot
   needs the current key material (from the config), which unlocks the master key first.
2. Slots are written to, and removed from, every site of the tenant, so that each site alone stays
   openable. All sites must answer before anything is written or removed.
3. The last slot cannot be removed: that would destroy the data by accident. Destroying it on purpose is
   `shred`, which needs the tenant's name typed again and removes every slot on every site: the sealed
   data that stays on the sites can then never be decrypted (for the end of a contract).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from drsvc.app import App
from drsvc.core import crypto
from drsvc.core.crypto import ScryptParams
from drsvc.core.errors import CryptoError, DRError, ObjectLocked, RepositoryError
from drsvc.core.layout import Handle, Kind, Layout
from drsvc.core.repository import new_id, read_config, unlock_repository
from drsvc.core.stores import ObjectStore


class KeySlotError(CryptoError):
    """A key slot operation was refused."""


@dataclass
class SlotInfo:
    id: str
    kind: str
    kdf: str
    sites: list[str] = field(default_factory=list)
    opens_configured_key: bool = False


class KeyManager:
    def __init__(self, app: App, tenant: str) -> None:
        self.app = app
        self.tenant = tenant
        self.layout = Layout(tenant)
        names = app.config.tenant_sites(tenant)
        if not names:
            raise KeySlotError("no source of this tenant names a site", tenant=tenant)
        self.stores: list[ObjectStore] = [app.store(n) for n in names]

    async def _slots(self) -> dict[str, tuple[dict[str, object], list[str]]]:
        """Every slot at every site (all must answer): id -> (slot, sites holding it)."""
        out: dict[str, tuple[dict[str, object], list[str]]] = {}
        for store in self.stores:
            try:
                _body, slots = await read_config(store, self.tenant)
            except DRError as exc:
                raise KeySlotError(
                    f"site {store.name} cannot be read: {exc.message}",
                    site=store.name,
                    hint="key slots change on every site at once; bring the site back first",
                ) from exc
            for slot in slots:
                sid = str(slot.get("id"))
                out.setdefault(sid, (slot, []))[1].append(store.name)
        return out

    async def list(self) -> list[SlotInfo]:
        kind, secret = self.app.key_material(self.tenant)
        infos = []
        for sid, (slot, sites) in sorted((await self._slots()).items()):
            kdf = slot.get("kdf")
            kdf_text = (
                f"scrypt n={kdf.get('n')} r={kdf.get('r')} p={kdf.get('p')}"
                if isinstance(kdf, dict)
                else "hkdf (key file)"
            )
            try:
                opens = crypto.open_key_slot(slot, kind, secret) is not None
            except CryptoError:
                opens = False
            infos.append(SlotInfo(sid, str(slot.get("kind")), kdf_text, sites, opens))
        return infos

    async def add(self, kind: str, secret: bytes, scrypt: ScryptParams = ScryptParams()) -> str:
        """A new slot for `secret` on every site; returns its id."""
        await self._slots()  # every site answers before anything is written
        cur_kind, cur_secret = self.app.key_material(self.tenant)
        keys, _params, _body, _slots = await unlock_repository(
            self.stores[0], self.tenant, cur_kind, cur_secret
        )
        sid = new_id()[:32]
        slot = crypto.make_key_slot(keys.suite, sid, keys.master, kind, secret, scrypt)
        data = json.dumps(slot, indent=1).encode()
        for store in self.stores:
            await store.put(self.layout.key(Handle(Kind.KEY, sid)), data)
        return sid

    async def remove(self, slot_id: str) -> None:
        slots = await self._slots()
        if slot_id not in slots:
            raise KeySlotError(
                f"no key slot {slot_id!r}", tenant=self.tenant, hint="`drsvc keys TENANT list` shows them"
            )
        if len(slots) == 1:
            raise KeySlotError(
                "refusing to remove the last key slot: the repository could never be opened again",
                tenant=self.tenant,
                slot=slot_id,
                hint="add another slot first; to destroy the data on purpose use `drsvc keys TENANT shred`",
            )
        for store in self.stores:
            await store.delete(self.layout.key(Handle(Kind.KEY, slot_id)))

    async def passwd(self, new_passphrase: bytes, scrypt: ScryptParams = ScryptParams()) -> tuple[str, str]:
        """Replace the slot the configured passphrase opens by one for `new_passphrase`: (old id, new id)."""
        kind, _secret = self.app.key_material(self.tenant)
        if kind != "passphrase":
            raise KeySlotError(
                "the tenant's configured key is a key file, not a passphrase",
                tenant=self.tenant,
                hint="use `keys add` and `keys remove` to replace a key file",
            )
        current = [s.id for s in await self.list() if s.opens_configured_key]
        if not current:
            raise KeySlotError("the configured passphrase opens no slot", tenant=self.tenant)
        new = await self.add("passphrase", new_passphrase, scrypt)
        for old in current:
            await self.remove(old)
        return current[0], new

    async def shred(self, confirm: str) -> int:
        """Remove every key slot on every site. Returns how many slot objects were deleted."""
        if confirm != self.tenant:
            raise KeySlotError(
                "crypto-shredding needs the tenant's name as confirmation",
                tenant=self.tenant,
                hint=f"pass --confirm {self.tenant}; this destroys the tenant's data on every site",
            )
        slots = await self._slots()
        n = 0
        locked: dict[str, str] = {}  # site -> the latest retain-until date among its locked slots
        for sid, (_slot, sites) in slots.items():
            for store in self.stores:
                if store.name in sites:
                    try:
                        await store.delete(self.layout.key(Handle(Kind.KEY, sid)))
                    except ObjectLocked as exc:  # shred everywhere else first, then say what is left
                        locked[store.name] = max(locked.get(store.name, ""), exc.until or "")
                        continue
                    n += 1
        if locked:
            where = ", ".join(
                f"{site} until {until or 'an unknown date'}" for site, until in sorted(locked.items())
            )
            raise KeySlotError(
                f"crypto-shredding is incomplete: object lock keeps key slots at {where}; the data stays "
                "readable there with the tenant's key material until then",
                tenant=self.tenant,
                hint="run `drsvc keys shred` again after that date; the other sites are shredded already",
            )
        for store in self.stores:  # prove it: nothing left to open
            _body, left = await read_config(store, self.tenant)
            if left:
                raise RepositoryError("key slots are still present after shredding", site=store.name)
        return n


def read_secret_file(path: str, kind: str) -> bytes:
    """A passphrase file's first line, or a key file's bytes."""
    with open(path, "rb") as f:
        data = f.read()
    if kind == "passphrase":
        return data.splitlines()[0] if data else b""
    return data


def generate_keyfile(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(64))
    finally:
        os.close(fd)
