"""Audit batches: runs of record lines sealed for the sites (docs/FORMAT.md section 20)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import zstandard

from drsvc.audit.record import VERSION, canonical, int_field, parse_record
from drsvc.core import crypto
from drsvc.core.crypto import Keys, ObjectType
from drsvc.core.errors import IntegrityError

MAX_BATCH_PLAINTEXT = 256 * 1024 * 1024


CODEC_RAW, CODEC_ZSTD = 0, 1


@dataclass(frozen=True)
class Batch:
    name: str
    first: int
    last: int
    lines: list[bytes]


class BatchSealer:
    """Seals runs of record lines as audit batches of one repository; deterministic (same lines, same
    name and bytes)."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self._salt_key = keys.suite.hkdf(keys.data_key, keys.repo_id, b"drsvc/1/audit-salt", 32)
        self._content_id = keys.content_id_function()

    def seal(self, lines: Sequence[bytes]) -> tuple[str, bytes]:
        """(name, sealed bytes) of a batch of record lines, in seq order. Blocking CPU work."""
        first, last = parse_record(lines[0]).seq, parse_record(lines[-1]).seq
        head = canonical({"v": VERSION, "first": first, "last": last, "count": len(lines)})
        plaintext = head + b"\n" + b"".join(ln + b"\n" for ln in lines)
        name = self._content_id(plaintext).hex()
        packed = zstandard.ZstdCompressor(level=6).compress(plaintext)
        body = (
            bytes([CODEC_ZSTD]) + packed if len(packed) < len(plaintext) else bytes([CODEC_RAW]) + plaintext
        )
        salt = self.keys.suite.mac(self._salt_key, plaintext)[:16]
        header = crypto.HEADER.pack(
            crypto.MAGIC, crypto.FORMAT_VERSION, self.keys.suite.ident, int(ObjectType.AUDIT), 0, salt
        )
        sealed = self.keys.object_key(salt).encrypt(crypto.counter_nonce(0), body, header + name.encode())
        return name, header + sealed


def open_batch(keys: Keys, name: str, sealed: bytes) -> Batch:
    """A batch fetched as `name`: authenticated, decompressed, its name the keyed id of its plaintext, its
    header agreeing with its lines. IntegrityError otherwise. The records themselves are not judged here."""
    body = crypto.open_object(keys, ObjectType.AUDIT, name, sealed)
    if not body:
        raise IntegrityError("empty audit batch", object=name)
    if body[0] == CODEC_RAW:
        plaintext = body[1:]
    elif body[0] == CODEC_ZSTD:
        try:
            if zstandard.frame_content_size(body[1:]) > MAX_BATCH_PLAINTEXT:
                raise IntegrityError("audit batch declares an oversized plaintext", object=name)
            plaintext = zstandard.ZstdDecompressor().decompress(body[1:], max_output_size=MAX_BATCH_PLAINTEXT)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"audit batch does not decompress: {exc}", object=name) from None
    else:
        raise IntegrityError(f"unknown audit batch codec {body[0]}", object=name)
    if keys.content_id_function()(plaintext).hex() != name:
        raise IntegrityError("audit batch is not the one its name says", object=name)
    head, _, rest = plaintext.partition(b"\n")
    lines = rest.split(b"\n")
    if lines.pop() != b"":
        raise IntegrityError("audit batch does not end with a newline", object=name)
    try:
        h = json.loads(head)
        first, last, count = int_field(h["first"]), int_field(h["last"]), int_field(h["count"])
        if h["v"] != VERSION or count != len(lines) or count < 1:
            raise ValueError("version or count")
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"malformed audit batch header: {exc}", object=name) from None
    return Batch(name, first, last, lines)
