"""How one copy of the config, a key slot, a snapshot record, a change-log segment or a WAL object is
verified (indexes and packs: by the repository's decoder and ``drsvc.check.verify_pack``). Each raises a
DRError when the copy is bad."""

from __future__ import annotations

import json
from typing import Any

from drsvc.core import crypto, segments
from drsvc.core.crypto import ObjectType
from drsvc.core.errors import IntegrityError
from drsvc.core.format import SnapshotRecord
from drsvc.core.layout import Handle
from drsvc.core.repository import Repository, canonical_config, dctx
from drsvc.core.walobject import open_wal


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


def verify_segment(repo: Repository, h: Handle, data: bytes) -> int:
    """A change-log segment: authenticated, decompressed and decoded, the stream, seq and time its name
    says, of a source whose tag it is filed under. The time of its last event."""
    seg = segments.decode_segment(segments.open_segment(repo.keys, h.name, data), h.name)
    segments.check_named(seg, h.name, seg.source)
    if repo.keys.source_tag(seg.source) != h.source_tag:
        raise IntegrityError("segment is filed under another source's tag", object=h.name)
    return seg.last_ns


def verify_wal(repo: Repository, h: Handle, data: bytes, source: str | None) -> int:
    """A WAL object of `source`: authenticated, decoded, its name and source checked, its data the size
    it declares. The source of a tag no configured source has is unknown: such a copy is authenticated
    only. The WAL file's time (0 when unknown)."""
    if source is None:
        crypto.open_object(repo.keys, ObjectType.WAL, h.name, data)
        return 0
    return open_wal(repo.keys, source, h.name, data, dctx()).time_ns
