"""The repository layout: each handle has one key, each key of ours parses back, foreign keys are refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drsvc.core.errors import RepositoryError
from drsvc.core.layout import Handle, Kind, Layout, check_tenant

hex_names = st.text("0123456789abcdef", min_size=16, max_size=64)
tenants = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,62}", fullmatch=True)


@st.composite
def handles(draw: st.DrawFn, kind: Kind | None = None) -> Handle:
    k = draw(st.sampled_from(list(Kind))) if kind is None else kind
    if k is Kind.CONFIG:
        return Handle(k)
    if k is Kind.WAL:
        return Handle(k, draw(wal_names), draw(hex_names))
    if k in (Kind.SNAPSHOT, Kind.SEGMENT):
        return Handle(k, draw(hex_names), draw(hex_names))
    return Handle(k, draw(hex_names))


wal_names = st.one_of(
    st.from_regex(r"\A[0-9A-F]{24}\Z"),
    st.from_regex(r"\A[0-9A-F]{24}\.partial\Z"),
    st.from_regex(r"\A[0-9A-F]{24}\.[0-9A-F]{8}\.backup\Z"),
    st.from_regex(r"\A[0-9A-F]{8}\.history\Z"),
)


def test_wal_names_are_postgresql_s_and_nothing_else() -> None:
    Handle(Kind.WAL, "000000010000000A000000FF", "ab" * 12)
    for bad in ("00000001000000000000000", "000000010000000000000002/x", "../00000002.history", "ab" * 24):
        with pytest.raises(ValueError):
            Handle(Kind.WAL, bad, "ab" * 12)


@given(tenants, handles())
def test_key_parse_roundtrip(tenant: str, h: Handle) -> None:
    layout = Layout(tenant)
    key = layout.key(h)
    assert layout.parse(key) == h
    assert key.startswith(layout.root)
    assert key.startswith(layout.prefix(h.kind, h.source_tag))
    assert key.startswith(layout.prefix(h.kind))


@pytest.mark.parametrize("kind", list(Kind))
@given(data=st.data())
def test_every_kind_roundtrips(kind: Kind, data: st.DataObject) -> None:
    layout = Layout("acme")
    h = data.draw(handles(kind))
    assert layout.parse(layout.key(h)) == h


def test_key_shapes() -> None:
    layout = Layout("hr")
    name, tag = "ab" + "0" * 30, "cd" * 12
    assert layout.key(Handle(Kind.CONFIG)) == "hr/config"
    assert layout.key(Handle(Kind.KEY, name)) == f"hr/keys/{name}"
    assert layout.key(Handle(Kind.PACK, name)) == f"hr/data/ab/{name}"
    assert layout.key(Handle(Kind.INDEX, name)) == f"hr/index/{name}"
    assert layout.key(Handle(Kind.SNAPSHOT, name, tag)) == f"hr/snapshots/{tag}/{name}"
    assert layout.prefix(Kind.SNAPSHOT) == "hr/snapshots/"
    assert layout.prefix(Kind.SNAPSHOT, tag) == f"hr/snapshots/{tag}/"
    assert layout.prefix(Kind.PACK) == "hr/data/"
    assert str(Handle(Kind.INDEX, name)) == f"index/{name}"
    assert str(Handle(Kind.CONFIG)) == "config"


segments = st.one_of(
    st.sampled_from(["acme", "other", "config", "keys", "data", "index", "snapshots", "", ".", "..", "01"]),
    hex_names,
    st.text(max_size=8),
)
keyish = st.one_of(st.text(max_size=120), st.lists(segments, min_size=1, max_size=5).map("/".join))


@given(keyish)
def test_parse_is_exact_or_refuses(key: str) -> None:
    """Any string parses to a handle whose key is that very string, or raises RepositoryError."""
    layout = Layout("acme")
    try:
        h = layout.parse(key)
    except RepositoryError as exc:
        assert exc.fields["key"] == key
        return
    assert layout.key(h) == key


@given(st.sampled_from(["acme2", "acm", "other", "acme.x"]), handles())
def test_other_tenants_keys_are_refused(other: str, h: Handle) -> None:
    with pytest.raises(RepositoryError):
        Layout("acme").parse(Layout(other).key(h))


NAME = "0123456789abcdef0123"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "acme",
        "acme/",
        "acme/config/x",
        "acme/configs",
        "acme/unknown/" + NAME,
        "acme/keys/",
        "acme/keys/" + NAME + "/x",
        "acme/keys/" + NAME.upper(),
        "acme/keys/short",
        "acme/keys/.tmp-" + NAME,
        "acme/index/" + NAME + "0" * 60,
        "acme/data/" + NAME,  # no fan-out directory
        "acme/data/zz/" + NAME,  # fan-out directory does not match the name
        "acme/data/01/" + NAME + "/x",
        "acme/snapshots/" + NAME,  # no source tag
        "acme/snapshots/not-hex/" + NAME,
        "/acme/config",
        "other/config",
        "acme/index/" + NAME + "\n",  # `$` alone would let a trailing newline through
        "acme/config\n",
    ],
)
def test_foreign_keys_are_refused(key: str) -> None:
    with pytest.raises(RepositoryError) as info:
        Layout("acme").parse(key)
    assert info.value.fields["key"] == key


@pytest.mark.parametrize(
    "args",
    [
        (Kind.CONFIG, NAME),
        (Kind.PACK, ""),
        (Kind.PACK, "xyz" * 8),
        (Kind.PACK, NAME.upper()),
        (Kind.INDEX, "abc"),
        (Kind.INDEX, "a" * 65),
        (Kind.INDEX, "../" + NAME),
        (Kind.SNAPSHOT, NAME),
        (Kind.SNAPSHOT, NAME, "not hex"),
        (Kind.PACK, NAME, NAME),
        (Kind.INDEX, NAME + "\n"),
        (Kind.SNAPSHOT, NAME, NAME + "\n"),
    ],
)
def test_invalid_handles(args: tuple[Kind, ...]) -> None:
    with pytest.raises(ValueError):
        Handle(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("tenant", ["", "Acme", "-acme", "a/b", "a b", "a" * 64, "..", "ä", "acme\n"])
def test_invalid_tenants(tenant: str) -> None:
    with pytest.raises(ValueError):
        check_tenant(tenant)
    with pytest.raises(ValueError):
        Layout(tenant)


@given(tenants)
def test_valid_tenants(tenant: str) -> None:
    assert Layout(tenant).root == tenant + "/"
