"""How one copy of the config, a key slot or a snapshot record is verified (indexes and packs: by the
repository's decoder and ``drsvc.check.verify_pack``). Each raises a DRError when the copy is bad."""

from __future__ import annotations

import json
from typing import Any

from drsvc.core import crypto
from drsvc.core.errors import IntegrityError
from drsvc.core.format import SnapshotRecord
from drsvc.core.layout import Handle
from drsvc.core.repository import Repository, canonical_config


def verify_config(repo: Repository, tenant: str, data: bytes) -> None:
    try:
        body = json.loads(data)
        unsigned = {k: v for k, v in body.items() if k != "mac"}
    except (ValueError, AttributeError):
        raise IntegrityError("the config is not JSON") from None
    keys = repo.keys
    if body.get("id") != keys.repo_id.hex() or body.get("tenant") != tenant:
        raise IntegrityError("the config is of another repository")
    if keys.config_mac(canonical_config(unsigned)) != body.get("mac"):
        raise IntegrityError("the config's MAC does not verify")


def parse_slot(name: str, suite: crypto.Suite, data: bytes) -> dict[str, Any]:
    """A key slot's JSON, if it is well formed (its wrapped key can be checked only by opening it)."""
    import base64
    import binascii

    try:
        slot = json.loads(data)
        ok = (
            isinstance(slot, dict)
            and slot.get("id") == name
            and slot.get("kind") in ("passphrase", "keyfile")
            and slot.get("suite") == suite.value
            and len(base64.b64decode(slot["salt"], validate=True)) == 16
            and len(base64.b64decode(slot["wrapped"], validate=True))
            == crypto.NONCE_LEN + crypto.MASTER_KEY_LEN + crypto.TAG_LEN
        )
    except (ValueError, KeyError, TypeError, binascii.Error):
        ok = False
    if not ok:
        raise IntegrityError("the key slot is malformed", object=f"keys/{name}")
    return dict(slot)


def decode_record(repo: Repository, h: Handle, data: bytes) -> SnapshotRecord:
    rec = repo.decode_snapshot(h.name, data)
    if repo.keys.source_tag(rec.source) != h.source_tag:
        raise IntegrityError("snapshot record is filed under another source's tag", object=h.name)
    return rec
