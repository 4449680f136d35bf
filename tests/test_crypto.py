"""Cipher suites, sealing and key slots: what opens, and that nothing else does."""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drsvc.core import crypto
from drsvc.core.crypto import (
    HEADER,
    MASTER_KEY_LEN,
    NONCE_LEN,
    TAG_LEN,
    BlobType,
    Keys,
    ObjectType,
    PackCipher,
    ScryptParams,
    Suite,
    make_key_slot,
    new_master_key,
    open_key_slot,
    open_object,
    seal_object,
    unlock,
)
from drsvc.core.errors import CryptoError, IntegrityError, WrongKeyError

FAST = ScryptParams(n=2**10)
SUITES = list(Suite)
NAME = "0123456789abcdef" * 2

suites = st.sampled_from(SUITES)
payloads = st.binary(max_size=4096)
blob_ids = st.binary(min_size=32, max_size=32)
names = st.text("0123456789abcdef", min_size=16, max_size=64)


def make_keys(suite: Suite) -> Keys:
    return Keys(suite, os.urandom(16), new_master_key())


def flip(data: bytes, index: int, mask: int) -> bytes:
    i = index % len(data)
    return data[:i] + bytes([data[i] ^ mask]) + data[i + 1 :]


# ---- suites ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
def test_suite_ident_roundtrip(suite: Suite) -> None:
    assert Suite.from_ident(suite.ident) is suite
    assert Suite(suite.value) is suite


def test_unknown_suite_ident() -> None:
    with pytest.raises(IntegrityError):
        Suite.from_ident(99)


@pytest.mark.parametrize("suite", SUITES)
@given(data=payloads, aad=st.binary(max_size=64), counter=st.integers(0, 2**32))
def test_aead_roundtrip_and_size(suite: Suite, data: bytes, aad: bytes, counter: int) -> None:
    aead = suite.aead(os.urandom(suite.key_len))
    nonce = crypto.counter_nonce(counter)
    sealed = aead.encrypt(nonce, data, aad)
    assert len(sealed) == len(data) + TAG_LEN
    assert aead.decrypt(nonce, sealed, aad) == data
    assert aead.decrypt(nonce, memoryview(sealed), aad) == data


@pytest.mark.parametrize("suite", SUITES)
def test_aead_rejects_short_and_tampered(suite: Suite) -> None:
    from cryptography.exceptions import InvalidTag

    aead = suite.aead(os.urandom(suite.key_len))
    nonce = crypto.counter_nonce(1)
    sealed = aead.encrypt(nonce, b"payload", b"aad")
    for bad in (sealed[: TAG_LEN - 1], flip(sealed, 0, 1), flip(sealed, -1, 0x80)):
        with pytest.raises(InvalidTag):
            aead.decrypt(nonce, bad, b"aad")
    with pytest.raises(InvalidTag):
        aead.decrypt(crypto.counter_nonce(2), sealed, b"aad")
    with pytest.raises(InvalidTag):
        aead.decrypt(nonce, sealed, b"other")


def test_sm4_and_aes_differ() -> None:
    key = os.urandom(32)
    nonce = crypto.counter_nonce(0)
    aes = Suite.AES_256_GCM.aead(key).encrypt(nonce, b"x" * 32, b"")
    sm4 = Suite.SM4_GCM.aead(key[:16]).encrypt(nonce, b"x" * 32, b"")
    assert aes != sm4


@pytest.mark.parametrize("suite", SUITES)
@given(data=st.binary(max_size=2048))
def test_content_id_is_keyed_and_stable(suite: Suite, data: bytes) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    f1 = suite.id_function(k1)
    assert len(f1(data)) == 32
    assert f1(data) == f1(memoryview(data)) == suite.id_function(k1)(data)
    assert f1(data) != suite.id_function(k2)(data)


def test_sm3_content_id_is_hmac_sm3() -> None:
    key, data = os.urandom(32), b"some chunk"
    assert Suite.SM4_GCM.id_function(key)(data) == crypto._hmac_sm3(key, data)
    if crypto._HAS_SM3_HMAC:
        assert crypto._hmac_sm3(key, data) == hmac.new(key, data, "sm3").digest()


@pytest.mark.parametrize("suite", SUITES)
def test_subkeys(suite: Suite) -> None:
    keys = make_keys(suite)
    subkeys = {keys.id_key, keys.data_key, keys._sub("tag"), keys._sub("config")}
    assert len(subkeys) == 4
    assert keys.master not in subkeys
    assert 0 <= keys.chunker_seed < 2**62
    tag = keys.source_tag("hr-files")
    assert len(tag) == 24 and int(tag, 16) >= 0
    assert tag == keys.source_tag("hr-files") != keys.source_tag("hr-db")
    # the same master key in another repository (another id) gives other subkeys
    other = Keys(suite, os.urandom(16), keys.master)
    assert other.id_key != keys.id_key and other.source_tag("hr-files") != tag
    assert keys.config_mac(b"{}") == keys.config_mac(b"{}") != keys.config_mac(b"{ }")


# ---- sealed objects --------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
@given(plaintext=payloads, name=names, otype=st.sampled_from([ObjectType.INDEX, ObjectType.SNAPSHOT]))
def test_seal_open_roundtrip(suite: Suite, plaintext: bytes, name: str, otype: ObjectType) -> None:
    keys = make_keys(suite)
    sealed = seal_object(keys, otype, name, plaintext)
    assert len(sealed) == HEADER.size + len(plaintext) + TAG_LEN
    assert open_object(keys, otype, name, sealed) == plaintext
    if len(plaintext) >= 16:
        assert plaintext not in sealed


@pytest.mark.parametrize("suite", SUITES)
def test_sealing_twice_differs(suite: Suite) -> None:
    """Each object has its own salt, hence its own key: equal plaintexts never give equal ciphertexts."""
    keys = make_keys(suite)
    a = seal_object(keys, ObjectType.INDEX, NAME, b"same")
    b = seal_object(keys, ObjectType.INDEX, NAME, b"same")
    assert a != b and a[: HEADER.size] != b[: HEADER.size]


@pytest.mark.parametrize("suite", SUITES)
@given(plaintext=st.binary(max_size=512), index=st.integers(min_value=0), mask=st.integers(1, 255))
def test_tampered_object_fails(suite: Suite, plaintext: bytes, index: int, mask: int) -> None:
    keys = make_keys(suite)
    sealed = seal_object(keys, ObjectType.SNAPSHOT, NAME, plaintext)
    with pytest.raises(IntegrityError) as info:
        open_object(keys, ObjectType.SNAPSHOT, NAME, flip(sealed, index, mask))
    assert info.value.fields["object"] == NAME


@pytest.mark.parametrize("suite", SUITES)
@given(plaintext=st.binary(max_size=256), cut=st.integers(min_value=1))
def test_truncated_object_fails(suite: Suite, plaintext: bytes, cut: int) -> None:
    keys = make_keys(suite)
    sealed = seal_object(keys, ObjectType.INDEX, NAME, plaintext)
    with pytest.raises(IntegrityError):
        open_object(keys, ObjectType.INDEX, NAME, sealed[: len(sealed) - 1 - cut % len(sealed)])
    with pytest.raises(IntegrityError):
        open_object(keys, ObjectType.INDEX, NAME, sealed + b"\0")


@pytest.mark.parametrize("suite", SUITES)
def test_object_bound_to_name_type_and_repository(suite: Suite) -> None:
    keys = make_keys(suite)
    sealed = seal_object(keys, ObjectType.INDEX, NAME, b"index body")
    with pytest.raises(IntegrityError):
        open_object(keys, ObjectType.INDEX, NAME[::-1], sealed)  # another name
    with pytest.raises(IntegrityError):
        open_object(keys, ObjectType.SNAPSHOT, NAME, sealed)  # another type
    with pytest.raises(IntegrityError):
        open_object(make_keys(suite), ObjectType.INDEX, NAME, sealed)  # another repository's keys
    other_suite = Suite.SM4_GCM if suite is Suite.AES_256_GCM else Suite.AES_256_GCM
    with pytest.raises(IntegrityError, match="sealed with"):
        open_object(Keys(other_suite, keys.repo_id, keys.master), ObjectType.INDEX, NAME, sealed)


def test_type_byte_rewritten_fails_authentication() -> None:
    """Rewriting the type in the header to match the opener still fails: the header is associated data."""
    keys = make_keys(Suite.AES_256_GCM)
    sealed = bytearray(seal_object(keys, ObjectType.INDEX, NAME, b"index body"))
    sealed[5] = int(ObjectType.SNAPSHOT)
    with pytest.raises(IntegrityError, match="authentication"):
        open_object(keys, ObjectType.SNAPSHOT, NAME, bytes(sealed))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (b"DRS", "too short"),
        (b"XYZ" + bytes(HEADER.size), "bad magic"),
        (crypto.HEADER.pack(b"DRS", 9, 1, 2, 0, bytes(16)), "version"),
        (crypto.HEADER.pack(b"DRS", 1, 7, 2, 0, bytes(16)), "suite"),
        (crypto.HEADER.pack(b"DRS", 1, 1, 3, 0, bytes(16)), "type"),
        (crypto.HEADER.pack(b"DRS", 1, 1, 2, 1, bytes(16)), "reserved"),
    ],
)
def test_parse_header_rejects(data: bytes, match: str) -> None:
    with pytest.raises(IntegrityError, match=match):
        crypto.parse_header(data, ObjectType.INDEX, NAME)


# ---- packs and blobs -------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
@given(
    blobs=st.lists(st.tuples(st.sampled_from(list(BlobType)), blob_ids, payloads), max_size=8),
)
def test_blob_roundtrip(suite: Suite, blobs: list[tuple[BlobType, bytes, bytes]]) -> None:
    keys = make_keys(suite)
    writer = PackCipher(keys)
    sealed = [writer.seal_blob(i + 1, t, bid, p) for i, (t, bid, p) in enumerate(blobs)]
    reader = PackCipher(keys, writer.salt)
    for (t, bid, p), s in zip(blobs, sealed, strict=True):
        assert len(s) == NONCE_LEN + len(p) + TAG_LEN
        assert reader.open_blob(t, bid, s, "data/x") == p
    assert len({s[:NONCE_LEN] for s in sealed}) == len(sealed)  # counter nonces never repeat in a pack


@pytest.mark.parametrize("suite", SUITES)
@given(payload=st.binary(max_size=512), index=st.integers(min_value=0), mask=st.integers(1, 255))
def test_tampered_blob_fails(suite: Suite, payload: bytes, index: int, mask: int) -> None:
    keys = make_keys(suite)
    cipher = PackCipher(keys)
    bid = os.urandom(32)
    sealed = cipher.seal_blob(1, BlobType.DATA, bid, payload)
    with pytest.raises(IntegrityError) as info:
        cipher.open_blob(BlobType.DATA, bid, flip(sealed, index, mask), "data/p")
    assert info.value.fields == {"object": "data/p", "blob": bid.hex()}


@pytest.mark.parametrize("suite", SUITES)
def test_blob_bound_to_id_type_and_pack(suite: Suite) -> None:
    keys = make_keys(suite)
    cipher = PackCipher(keys)
    bid = os.urandom(32)
    sealed = cipher.seal_blob(1, BlobType.DATA, bid, b"chunk")
    with pytest.raises(IntegrityError):
        cipher.open_blob(BlobType.DATA, os.urandom(32), sealed, "p")  # another blob id
    with pytest.raises(IntegrityError):
        cipher.open_blob(BlobType.TREE, bid, sealed, "p")  # another blob type
    with pytest.raises(IntegrityError):
        PackCipher(keys).open_blob(BlobType.DATA, bid, sealed, "p")  # another pack's salt
    with pytest.raises(IntegrityError, match="too short"):
        cipher.open_blob(BlobType.DATA, bid, sealed[: NONCE_LEN + TAG_LEN - 1], "p")


@pytest.mark.parametrize("suite", SUITES)
def test_pack_header_bound_to_pack_name(suite: Suite) -> None:
    cipher = PackCipher(make_keys(suite))
    sealed = cipher.seal_header(NAME, b"header")
    assert cipher.open_header(NAME, sealed) == b"header"
    with pytest.raises(IntegrityError):
        cipher.open_header(NAME[::-1], sealed)
    with pytest.raises(IntegrityError):
        cipher.open_header(NAME, flip(sealed, 3, 1))


# ---- key slots -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
def test_passphrase_slot(suite: Suite) -> None:
    master = new_master_key()
    slot = make_key_slot(suite, "slot1", master, "passphrase", b"correct horse", FAST)
    assert slot["kdf"] == {"name": "scrypt", "n": 2**10, "r": 8, "p": FAST.p}
    assert open_key_slot(slot, "passphrase", b"correct horse") == master
    assert open_key_slot(slot, "passphrase", b"correct horsf") is None
    assert open_key_slot(slot, "keyfile", b"correct horse") is None  # a slot of another kind
    # a slot is plain JSON and survives a trip through it; the master key is nowhere in it
    text = json.dumps(slot)
    assert open_key_slot(json.loads(text), "passphrase", b"correct horse") == master
    assert crypto._b64(master) not in text and master.hex() not in text


def test_slots_keep_their_own_scrypt_cost() -> None:
    """New slots take the default cost (OWASP's N=2^14 r=8 p=5: 16 MiB); a slot written with the earlier
    default (N=2^15 r=8 p=1) still opens, with the cost it records."""
    assert ScryptParams() == ScryptParams(n=2**14, r=8, p=5)
    master = new_master_key()
    old = make_key_slot(
        Suite.AES_256_GCM, "old", master, "passphrase", b"pw", ScryptParams(n=2**15, r=8, p=1)
    )
    assert old["kdf"] == {"name": "scrypt", "n": 2**15, "r": 8, "p": 1}
    assert open_key_slot(old, "passphrase", b"pw") == master


@pytest.mark.parametrize("suite", SUITES)
def test_keyfile_slot(suite: Suite) -> None:
    master, keyfile = new_master_key(), os.urandom(64)
    slot = make_key_slot(suite, "slot2", master, "keyfile", keyfile)
    assert "kdf" not in slot
    assert open_key_slot(slot, "keyfile", keyfile) == master
    assert open_key_slot(slot, "keyfile", os.urandom(64)) is None
    assert open_key_slot(slot, "passphrase", keyfile) is None


@pytest.mark.parametrize("suite", SUITES)
def test_unlock_tries_every_slot(suite: Suite) -> None:
    master, keyfile = new_master_key(), os.urandom(32)
    slots = [
        make_key_slot(suite, "a", master, "passphrase", b"alice", FAST),
        make_key_slot(suite, "b", master, "passphrase", b"bob", FAST),
        make_key_slot(suite, "c", master, "keyfile", keyfile),
    ]
    assert unlock(slots, "passphrase", b"alice", "hr") == master
    assert unlock(slots, "passphrase", b"bob", "hr") == master
    assert unlock(slots, "keyfile", keyfile, "hr") == master
    with pytest.raises(WrongKeyError) as info:
        unlock(slots, "passphrase", b"mallory", "hr")
    assert info.value.fields == {"tenant": "hr"}
    assert "3 key slots" in info.value.message and info.value.hint
    with pytest.raises(WrongKeyError, match="key file"):
        unlock(slots, "keyfile", b"not the key file, but long enough", "hr")
    with pytest.raises(WrongKeyError):
        unlock([], "passphrase", b"alice", "hr")


def test_slot_bound_to_its_id_and_intact() -> None:
    master = new_master_key()
    slot = make_key_slot(Suite.AES_256_GCM, "slot1", master, "passphrase", b"pw", FAST)
    assert open_key_slot({**slot, "id": "slot2"}, "passphrase", b"pw") is None
    wrapped = crypto._unb64(slot["wrapped"])
    for i in (0, NONCE_LEN, len(wrapped) - 1):
        bad = {**slot, "wrapped": crypto._b64(flip(wrapped, i, 1))}
        assert open_key_slot(bad, "passphrase", b"pw") is None
    salted = {**slot, "salt": crypto._b64(os.urandom(16))}
    assert open_key_slot(salted, "passphrase", b"pw") is None


def test_damaged_slots_open_nothing_and_do_not_block_the_others() -> None:
    """Key slots are plaintext JSON at a site: a damaged or foreign one must not stop an unlock."""
    master = new_master_key()
    good = make_key_slot(Suite.AES_256_GCM, "good", master, "passphrase", b"pw", FAST)
    damaged: list[Any] = [
        {"kind": "passphrase"},
        {**good, "suite": "rot13"},
        {**good, "wrapped": "not base64!"},
        {**good, "salt": None},
        {**good, "kdf": "scrypt"},
        {**good, "id": 5},
        ["kind", "passphrase"],
    ]
    for slot in damaged:
        assert open_key_slot(slot, "passphrase", b"pw") is None
    assert unlock([*damaged, good], "passphrase", b"pw", "hr") == master
    with pytest.raises(WrongKeyError):
        unlock(damaged, "passphrase", b"pw", "hr")


def test_slot_errors() -> None:
    master = new_master_key()
    with pytest.raises(CryptoError, match="empty passphrase"):
        make_key_slot(Suite.AES_256_GCM, "s", master, "passphrase", b"", FAST)
    with pytest.raises(CryptoError, match="unknown key slot kind"):
        make_key_slot(Suite.AES_256_GCM, "s", master, "yubikey", b"x")
    slot = make_key_slot(Suite.AES_256_GCM, "s", master, "passphrase", b"pw", FAST)
    with pytest.raises(CryptoError, match="key derivation"):
        open_key_slot({**slot, "kdf": {**slot["kdf"], "name": "md5"}}, "passphrase", b"pw")
    short = make_key_slot(Suite.AES_256_GCM, "s", master[:32], "passphrase", b"pw", FAST)
    with pytest.raises(CryptoError, match="wrong length"):
        open_key_slot(short, "passphrase", b"pw")
    with pytest.raises(CryptoError, match="at least"):
        make_key_slot(Suite.AES_256_GCM, "s", master, "keyfile", b"too short")


@pytest.mark.parametrize(
    "kdf",
    [{"n": 2**30}, {"n": 1000}, {"n": 2**4}, {"r": 10_000}, {"p": 0}, {"n": "1024"}, {"n": 2**20, "r": 32}],
)
def test_slot_with_costly_or_odd_scrypt_is_refused_before_deriving(kdf: dict[str, Any]) -> None:
    """A slot is plaintext at a site: its scrypt cost is bounded before any memory is spent on it."""
    slot = make_key_slot(Suite.AES_256_GCM, "s", new_master_key(), "passphrase", b"pw", FAST)
    with pytest.raises(CryptoError, match="scrypt parameters"):
        open_key_slot({**slot, "kdf": {**slot["kdf"], **kdf}}, "passphrase", b"pw")


def test_new_master_keys() -> None:
    a, b = new_master_key(), new_master_key()
    assert len(a) == len(b) == MASTER_KEY_LEN and a != b


def test_a_slot_this_version_cannot_use_is_skipped_by_unlock() -> None:
    """A hostile site's (or a newer writer's) slot with an unknown KDF or a huge cost must not lock out the
    valid slots: unlock skips it and says so if nothing opens."""
    master = new_master_key()
    good = make_key_slot(Suite.AES_256_GCM, "good", master, "passphrase", b"pw", FAST)
    costly = {**good, "id": "costly", "kdf": {**good["kdf"], "n": 2**30}}
    foreign = {**good, "id": "argon", "kdf": {"name": "argon2id", "m": 65536}}
    assert unlock([costly, foreign, good], "passphrase", b"pw", "hr") == master
    with pytest.raises(
        WrongKeyError, match=r"unusable slots skipped: costly: .*scrypt.*argon: .*key derivation"
    ):
        unlock([costly, foreign, good], "passphrase", b"wrong", "hr")
