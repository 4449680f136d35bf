"""The chunker's windowed CDC cuts exactly where pyfastcdc's stream chunker cuts; fixed chunks align."""

from __future__ import annotations

import io

import hypothesis.strategies as st
from hypothesis import given, settings
from pyfastcdc import FastCDC

from snapshot.chunker import Chunker, ChunkParams


@st.composite
def contents(draw: st.DrawFn) -> bytes:
    seed = draw(st.integers(0, 2**32))
    size = draw(st.integers(0, 3_000_000))
    import random

    rng = random.Random(seed)
    kind = draw(st.sampled_from(["random", "text", "runs"]))
    if kind == "random":
        return rng.randbytes(size)
    if kind == "text":
        words = [rng.randbytes(rng.randint(1, 12)) for _ in range(50)]
        out = bytearray()
        while len(out) < size:
            out += rng.choice(words) + b" "
        return bytes(out[:size])
    return bytes((i // 70_000) % 256 for i in range(size))  # long runs: cuts at max_size


@settings(max_examples=40, deadline=None)
@given(
    data=contents(),
    params=st.sampled_from([(2048, 8192, 32768), (16384, 65536, 262144)]),
    seed=st.integers(0, 2**62 - 1),
    read_size=st.sampled_from([65536, 1 << 20]),
)
def test_windowed_cdc_equals_stream_cdc(
    data: bytes, params: tuple[int, int, int], seed: int, read_size: int
) -> None:
    lo, avg, hi = params
    reference = FastCDC(avg, min_size=lo, max_size=hi, seed=seed)
    expected = [bytes(c.data) for c in reference.cut_stream(io.BytesIO(data))]
    chunker = Chunker(ChunkParams(lo, avg, hi, seed), read_size=read_size)
    got = [bytes(c) for c in chunker.cdc(io.BytesIO(data))]
    assert got == expected
    assert b"".join(got) == data


@given(
    data=st.binary(max_size=300_000),
    size=st.sampled_from([4096, 32768]),
    start=st.integers(0, 8),
    limit=st.integers(-1, 200_000),
)
def test_fixed_chunks_are_aligned_and_bounded(data: bytes, size: int, start: int, limit: int) -> None:
    f = io.BytesIO(data)
    f.seek(start * size)
    got = [bytes(c) for c in Chunker(ChunkParams(64, 256, 1024, 0), read_size=65536).fixed(f, size, limit)]
    tail = data[start * size :]
    expect = tail if limit < 0 else tail[:limit]
    assert b"".join(got) == expect
    assert all(len(c) == size for c in got[:-1])
