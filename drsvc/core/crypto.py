"""Keys, cipher suites and sealing.

Key hierarchy (docs/FORMAT.md):
1. A tenant repository has one random 64-byte master key, stored only wrapped in key slots: a passphrase
   through scrypt, or a key file, each giving a wrapping key for the suite's AEAD.
2. Subkeys come from the master key by HKDF (suite hash, salt = repository id): ``id`` (keyed content ids),
   ``data`` (sealing), ``tag`` (opaque source tags), ``config`` (authenticates the plaintext config),
   ``chunker`` (the secret gear seed for content-defined chunking, so chunk boundaries leak nothing).
3. Every sealed object and every pack has its own random 128-bit salt; its key is HKDF(data key, salt).
   Inside one object key, nonces are a counter (0 for an object's body or a pack's header, 1.. for blobs),
   so a (key, nonce) pair cannot repeat and each key seals far fewer messages than GCM's safe limit.
4. Associated data binds every sealed piece to what it is: object type and name, or blob type and id.
"""

from __future__ import annotations

import base64
import enum
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from drsvc.core.errors import CryptoError, IntegrityError, WrongKeyError

MAGIC = b"DRS"
FORMAT_VERSION = 1
HEADER = struct.Struct(">3sBBBH16s")  # magic, version, suite id, object type, reserved, salt
NONCE_LEN = 12
TAG_LEN = 16
MASTER_KEY_LEN = 64
MIN_KEYFILE_LEN = 32


class ObjectType(enum.IntEnum):
    PACK = 1
    INDEX = 2
    SNAPSHOT = 3
    KEYSLOT = 4
    PRUNE = 5
    SEGMENT = 6
    WAL = 7
    AUDIT = 8
    DRILL = 9


class BlobType(enum.IntEnum):
    DATA = 1
    TREE = 2


class Suite(enum.Enum):
    """A cipher suite: AEAD, keyed content-id function and KDF hash, recorded per repository and object."""

    AES_256_GCM = "aes-256-gcm"
    SM4_GCM = "sm4-gcm"

    @property
    def ident(self) -> int:
        return 1 if self is Suite.AES_256_GCM else 2

    @classmethod
    def from_ident(cls, ident: int) -> Suite:
        for s in cls:
            if s.ident == ident:
                return s
        raise IntegrityError(f"unknown cipher suite id {ident}")

    @property
    def key_len(self) -> int:
        return 32 if self is Suite.AES_256_GCM else 16

    def hash(self) -> hashes.HashAlgorithm:
        return hashes.SHA256() if self is Suite.AES_256_GCM else hashes.SM3()

    def hkdf(self, key: bytes, salt: bytes, info: bytes, length: int) -> bytes:
        return HKDF(self.hash(), length, salt, info).derive(key)

    def aead(self, key: bytes) -> Aead:
        return _AesGcm(key) if self is Suite.AES_256_GCM else _Sm4Gcm(key)

    def mac(self, key: bytes, data: bytes | memoryview) -> bytes:
        """The suite's MAC: HMAC-SHA256, or HMAC-SM3 for the domestic suite."""
        if self is Suite.AES_256_GCM:
            return hmac.new(key, data, "sha256").digest()
        return _hmac_sm3(key, data)

    def id_function(self, key: bytes) -> Callable[[bytes | memoryview], bytes]:
        """Keyed 256-bit content id: BLAKE3 keyed mode, or HMAC-SM3 for the domestic suite."""
        if self is Suite.AES_256_GCM:
            return lambda data: blake3.blake3(data, key=key, max_threads=1).digest()
        return lambda data: _hmac_sm3(key, data)


def _hmac_sm3(key: bytes, data: bytes | memoryview) -> bytes:
    if _HAS_SM3_HMAC:
        return hmac.new(key, data, "sm3").digest()
    from cryptography.hazmat.primitives.hmac import HMAC

    h = HMAC(key, hashes.SM3())
    h.update(bytes(data))
    return h.finalize()


try:
    hmac.new(b"k", b"", "sm3")
    _HAS_SM3_HMAC = True
except ValueError:
    _HAS_SM3_HMAC = False


class Aead:
    def encrypt(self, nonce: bytes, data: bytes | memoryview, aad: bytes) -> bytes:
        raise NotImplementedError

    def decrypt(self, nonce: bytes, data: bytes | memoryview, aad: bytes) -> bytes:
        raise NotImplementedError


class _AesGcm(Aead):
    def __init__(self, key: bytes) -> None:
        self._a = AESGCM(key)

    def encrypt(self, nonce: bytes, data: bytes | memoryview, aad: bytes) -> bytes:
        return self._a.encrypt(nonce, data, aad)

    def decrypt(self, nonce: bytes, data: bytes | memoryview, aad: bytes) -> bytes:
        return self._a.decrypt(nonce, data, aad)


class _Sm4Gcm(Aead):
    def __init__(self, key: bytes) -> None:
        self._key = key

    def encrypt(self, nonce: bytes, data: bytes | memoryview, aad: bytes) -> bytes:
        enc = Cipher(algorithms.SM4(self._key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        return enc.update(data) + enc.finalize() + enc.tag

    def decrypt(self, nonce: bytes, data: bytes | memoryview, aad: bytes) -> bytes:
        if len(data) < TAG_LEN:
            raise InvalidTag()
        mv = memoryview(data)
        dec = Cipher(algorithms.SM4(self._key), modes.GCM(nonce, bytes(mv[-TAG_LEN:]))).decryptor()
        dec.authenticate_additional_data(aad)
        return dec.update(mv[:-TAG_LEN]) + dec.finalize()


def counter_nonce(n: int) -> bytes:
    return n.to_bytes(NONCE_LEN, "big")


@dataclass(frozen=True)
class Keys:
    """The subkeys of one tenant repository, derived from its master key."""

    suite: Suite
    repo_id: bytes
    master: bytes

    def _sub(self, purpose: str, length: int = 32) -> bytes:
        return self.suite.hkdf(self.master, self.repo_id, b"drsvc/1/" + purpose.encode(), length)

    @property
    def id_key(self) -> bytes:
        return self._sub("id")

    @property
    def data_key(self) -> bytes:
        return self._sub("data")

    @property
    def chunker_seed(self) -> int:
        # pyfastcdc shifts the seed left by one inside a uint64: keep it to 62 bits.
        return int.from_bytes(self._sub("chunker", 8), "big") >> 2

    def content_id_function(self) -> Callable[[bytes | memoryview], bytes]:
        return self.suite.id_function(self.id_key)

    def source_tag(self, source: str) -> str:
        return self.suite.mac(self._sub("tag"), source.encode()).hex()[:24]

    def config_mac(self, canonical: bytes) -> str:
        return self.suite.mac(self._sub("config"), canonical).hex()

    def object_key(self, salt: bytes) -> Aead:
        return self.suite.aead(self.suite.hkdf(self.data_key, salt, b"drsvc/1/object", self.suite.key_len))


def _header(suite: Suite, otype: ObjectType, salt: bytes) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, suite.ident, int(otype), 0, salt)


def parse_header(data: bytes | memoryview, otype: ObjectType, name: str) -> tuple[Suite, bytes]:
    """The suite and salt of a sealed object's header, checking magic, version and type."""
    if len(data) < HEADER.size:
        raise IntegrityError("object too short for a header", object=name)
    magic, version, suite_id, t, reserved, salt = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError("not a drsvc object (bad magic)", object=name)
    if version != FORMAT_VERSION:
        raise IntegrityError(f"unsupported object format version {version}", object=name)
    if t != int(otype):
        raise IntegrityError(f"object type {t} where {int(otype)} was expected", object=name)
    if reserved != 0:  # not covered by a pack's AEAD: a flipped bit here must not pass unnoticed
        raise IntegrityError("reserved header field is not zero", object=name)
    try:
        return Suite.from_ident(suite_id), salt
    except IntegrityError as exc:
        raise IntegrityError(exc.message, object=name) from None


def seal_object(keys: Keys, otype: ObjectType, name: str, plaintext: bytes) -> bytes:
    """Seal one whole object (index, snapshot record): header, then the AEAD of the body under nonce 0."""
    salt = os.urandom(16)
    header = _header(keys.suite, otype, salt)
    body = keys.object_key(salt).encrypt(counter_nonce(0), plaintext, header + name.encode())
    return header + body


def open_object(keys: Keys, otype: ObjectType, name: str, data: bytes) -> bytes:
    suite, salt = parse_header(data, otype, name)
    if suite is not keys.suite:
        raise IntegrityError(
            f"object sealed with {suite.value}, repository uses {keys.suite.value}", object=name
        )
    header = bytes(data[: HEADER.size])
    try:
        return keys.object_key(salt).decrypt(
            counter_nonce(0), memoryview(data)[HEADER.size :], header + name.encode()
        )
    except InvalidTag:
        raise IntegrityError("object failed authentication", object=name) from None


class PackCipher:
    """Seals the blobs and header of one pack under the pack's own subkey."""

    def __init__(self, keys: Keys, salt: bytes | None = None) -> None:
        self.suite = keys.suite
        self.salt = salt if salt is not None else os.urandom(16)
        self._aead = keys.object_key(self.salt)

    def header(self) -> bytes:
        return _header(self.suite, ObjectType.PACK, self.salt)

    @staticmethod
    def blob_aad(btype: BlobType, blob_id: bytes) -> bytes:
        return b"blob" + bytes([int(btype)]) + blob_id

    def seal_blob(self, counter: int, btype: BlobType, blob_id: bytes, payload: bytes) -> bytes:
        nonce = counter_nonce(counter)
        return nonce + self._aead.encrypt(nonce, payload, self.blob_aad(btype, blob_id))

    def open_blob(self, btype: BlobType, blob_id: bytes, sealed: bytes | memoryview, where: str) -> bytes:
        mv = memoryview(sealed)
        if len(mv) < NONCE_LEN + TAG_LEN:
            raise IntegrityError("blob too short", object=where, blob=blob_id.hex())
        try:
            return self._aead.decrypt(bytes(mv[:NONCE_LEN]), mv[NONCE_LEN:], self.blob_aad(btype, blob_id))
        except InvalidTag:
            raise IntegrityError("blob failed authentication", object=where, blob=blob_id.hex()) from None

    def seal_header(self, pack_name: str, plaintext: bytes) -> bytes:
        return self._aead.encrypt(counter_nonce(0), plaintext, b"packheader" + pack_name.encode())

    def open_header(self, pack_name: str, sealed: bytes | memoryview) -> bytes:
        try:
            return self._aead.decrypt(counter_nonce(0), sealed, b"packheader" + pack_name.encode())
        except InvalidTag:
            raise IntegrityError("pack header failed authentication", object=pack_name) from None


# ---- key slots -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScryptParams:
    """scrypt's cost for new passphrase slots (each slot records its own). The default is one of OWASP's
    equivalent minimum settings (Password Storage Cheat Sheet: N=2^17 r=8 p=1, ..., N=2^14 r=8 p=5): 16 MiB
    and ~0.23 s here. The earlier N=2^15 r=8 p=1 took 32 MiB, which was the peak memory of every short
    command that opens a repository (prune's, in benchmarks/prune.py), for less than half the work."""

    n: int = 2**14
    r: int = 8
    p: int = 5


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode())


def _wrapping_key(suite: Suite, slot: dict[str, Any], secret: bytes) -> bytes:
    salt = _unb64(slot["salt"])
    if slot["kind"] == "passphrase":
        kdf = slot["kdf"]
        if kdf.get("name") != "scrypt":
            raise CryptoError(f"unknown key derivation {kdf.get('name')!r} in key slot", slot=slot.get("id"))
        n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
        # the slot is plaintext at the site: bound its cost so a hostile site cannot exhaust our memory
        if not (
            isinstance(n, int)
            and isinstance(r, int)
            and isinstance(p, int)
            and 2**10 <= n <= 2**20
            and n & (n - 1) == 0
            and 1 <= r <= 32
            and 1 <= p <= 16
            and 128 * n * r <= 1024**3
        ):
            raise CryptoError("key slot has out-of-range scrypt parameters", slot=slot.get("id"))
        return Scrypt(salt=salt, length=suite.key_len, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(secret)
    if slot["kind"] == "keyfile":
        return suite.hkdf(secret, salt, b"drsvc/1/keyfile", suite.key_len)
    raise CryptoError(f"unknown key slot kind {slot['kind']!r}", slot=slot.get("id"))


def make_key_slot(
    suite: Suite, slot_id: str, master: bytes, kind: str, secret: bytes, scrypt: ScryptParams = ScryptParams()
) -> dict[str, Any]:
    """A key slot: the master key wrapped under a key derived from a passphrase or key file."""
    if kind == "passphrase" and not secret:
        raise CryptoError("an empty passphrase is not allowed", slot=slot_id)
    if kind == "keyfile" and len(secret) < MIN_KEYFILE_LEN:
        raise CryptoError(
            f"a key file must hold at least {MIN_KEYFILE_LEN} bytes",
            slot=slot_id,
            hint="make one with: head -c 64 /dev/urandom > tenant.key",
        )
    slot: dict[str, Any] = {"id": slot_id, "kind": kind, "suite": suite.value, "salt": _b64(os.urandom(16))}
    if kind == "passphrase":
        slot["kdf"] = {"name": "scrypt", "n": scrypt.n, "r": scrypt.r, "p": scrypt.p}
    nonce = os.urandom(NONCE_LEN)  # one message per wrapping key: a random nonce is safe here
    aead = suite.aead(_wrapping_key(suite, slot, secret))
    slot["wrapped"] = _b64(nonce + aead.encrypt(nonce, master, b"keyslot" + slot_id.encode()))
    return slot


def open_key_slot(slot: dict[str, Any], kind: str, secret: bytes) -> bytes | None:
    """The master key if `secret` opens this slot, None if it does not (a wrong passphrase or key file)."""
    if not isinstance(slot, dict) or slot.get("kind") != kind:
        return None
    try:
        suite = Suite(slot["suite"])
        wrapped = _unb64(slot["wrapped"])
        aead = suite.aead(_wrapping_key(suite, slot, secret))
        master = aead.decrypt(wrapped[:NONCE_LEN], wrapped[NONCE_LEN:], b"keyslot" + slot["id"].encode())
    except (InvalidTag, KeyError, TypeError, ValueError, AttributeError):
        return None  # a damaged or foreign slot file opens nothing; the other slots are still tried
    if len(master) != MASTER_KEY_LEN:
        raise CryptoError("key slot holds a key of the wrong length", slot=slot["id"])
    return master


def unlock(slots: list[dict[str, Any]], kind: str, secret: bytes, tenant: str) -> bytes:
    """The master key from the first slot `secret` opens. A slot this version cannot use (unknown KDF,
    out-of-range parameters: a newer writer, or a hostile site) is skipped, never a reason to stop."""
    unusable: list[str] = []
    for slot in slots:
        try:
            master = open_key_slot(slot, kind, secret)
        except CryptoError as exc:
            unusable.append(f"{slot.get('id')}: {exc.message}")
            continue
        if master is not None:
            return master
    what = "passphrase" if kind == "passphrase" else "key file"
    skipped = f"; unusable slots skipped: {'; '.join(unusable)}" if unusable else ""
    raise WrongKeyError(f"wrong {what}: it opens none of the {len(slots)} key slots{skipped}", tenant=tenant)


def new_master_key() -> bytes:
    return os.urandom(MASTER_KEY_LEN)


__all__ = [
    "BlobType",
    "Keys",
    "ObjectType",
    "PackCipher",
    "ScryptParams",
    "Suite",
    "make_key_slot",
    "new_master_key",
    "open_object",
    "seal_object",
    "unlock",
]
