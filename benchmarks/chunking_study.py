"""Which content-defined chunking parameters should drsvc use? A study on the benchmark dataset.

    python -m benchmarks.chunking_study [--data /tmp/bench-data] [--scale 1.0] [--rounds N] [--db-pages N]

1. Generate the dataset (``benchmarks.dataset``) afresh in --data.
2. Full pass: cut every file with each chunker, id every chunk (keyed BLAKE3, as drsvc does), compress each
   new chunk once with zstd level 1 (stored size = 1 codec byte + min(zstd, raw), as
   ``drsvc.core.format.encode_payload``; plus the per-blob cost in a pack: 12-byte nonce, 16-byte tag and
   a ~48-byte entry in the pack header).
3. ``mutate`` round 1 (..N with --rounds N), which reports the real change per class of file.
4. Incremental pass after each round: cut again; the chunks whose id was not stored before are what an
   incremental adds.

Chunkers: FastCDC (pyfastcdc, FastCDC 2020, normalized chunking 1) with avg 16K/32K/64K/128K/1M, min=avg/4,
max=avg*4 (pyfastcdc's real mean is about avg+min), for every file; and page-aware alternatives for the
database-like files only (``*.db``): fixed 8/32/64 KiB chunks aligned to the file start (so to pages), and
CDC with avg 8K. Results are per class (text, office, db) so that any "general CDC + page mode" pair can be
added up; the tables print both. Throughput is single-core CPU time of cut + id + compress, files already
in memory (no I/O).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import zstandard
from pyfastcdc import FastCDC

from benchmarks import dataset

KiB = 1024
MiB = 1024 * 1024
# Per-blob cost in a pack besides its payload: nonce + GCM tag + msgpack pack-header entry (type, 32-byte
# id, offset, length, raw length).
BLOB_OVERHEAD = 12 + 16 + 48
# A fixed, non-zero gear seed, as a tenant's ``Keys.chunker_seed`` would be.
CDC_SEED = 0x2545F4914F6CDD1D >> 2
ID_KEY = b"drsvc-chunking-study-id-key-32b!"
CLASSES = ("text", "office", "db")


Cutter = Callable[[bytes], Iterable[memoryview]]


@dataclass(frozen=True)
class Chunker:
    name: str
    classes: tuple[str, ...]  # the file classes it is measured on
    cut: Cutter
    note: str = ""


def cdc(avg: int) -> Cutter:
    c = FastCDC(avg, min_size=avg // 4, max_size=avg * 4, seed=CDC_SEED)

    def cut(data: bytes) -> Iterable[memoryview]:
        return (ch.data for ch in c.cut_buf(data))

    return cut


def fixed(size: int) -> Cutter:
    def cut(data: bytes) -> Iterable[memoryview]:
        mv = memoryview(data)
        return (mv[i : i + size] for i in range(0, len(mv), size))

    return cut


def _label(n: int) -> str:
    return f"{n // MiB}M" if n >= MiB else f"{n // KiB}K"


CHUNKERS: tuple[Chunker, ...] = (
    *(Chunker(f"cdc-{_label(a)}", CLASSES, cdc(a)) for a in (16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, MiB)),
    Chunker("cdc-8K", ("db",), cdc(8 * KiB)),
    *(Chunker(f"fixed-{_label(s)}", ("db",), fixed(s)) for s in (8 * KiB, 32 * KiB, 64 * KiB)),
)


@dataclass
class ClassStats:
    bytes: int = 0
    refs: int = 0  # chunk references (chunks in files, with repeats)
    unique: int = 0  # distinct chunks
    stored: int = 0  # payload bytes of distinct chunks (codec byte + zstd or raw)
    cut_s: float = 0.0
    id_s: float = 0.0
    zstd_s: float = 0.0
    # after mutate: chunks not in the repository yet, all of them and those of files that existed before
    new_chunks: int = 0
    new_stored: int = 0
    new_raw: int = 0
    edit_chunks: int = 0
    edit_stored: int = 0
    edit_raw: int = 0

    @property
    def cpu_s(self) -> float:
        return self.cut_s + self.id_s + self.zstd_s

    @property
    def new_with_overhead(self) -> int:
        return self.new_stored + self.new_chunks * BLOB_OVERHEAD

    @property
    def edit_with_overhead(self) -> int:
        return self.edit_stored + self.edit_chunks * BLOB_OVERHEAD


def _process(
    ch: Chunker,
    data: bytes,
    st: ClassStats,
    seen: dict[bytes, int],
    cctx: zstandard.ZstdCompressor,
    phase: str,  # "full", "edit" (incremental, file existed) or "new" (incremental, new file)
) -> None:
    t0 = time.perf_counter()
    chunks = list(ch.cut(data))
    t1 = time.perf_counter()
    ids = [blake3.blake3(c, key=ID_KEY, max_threads=1).digest() for c in chunks]
    t2 = time.perf_counter()
    for cid, c in zip(ids, chunks, strict=True):
        if cid in seen:
            continue
        size = 1 + min(len(cctx.compress(c)), len(c))
        seen[cid] = size
        if phase == "full":
            st.unique += 1
            st.stored += size
            continue
        st.new_chunks += 1
        st.new_stored += size
        st.new_raw += len(c)
        if phase == "edit":
            st.edit_chunks += 1
            st.edit_stored += size
            st.edit_raw += len(c)
    t3 = time.perf_counter()
    if phase == "full":
        st.bytes += len(data)
        st.refs += len(chunks)
        st.cut_s += t1 - t0
        st.id_s += t2 - t1
        st.zstd_s += t3 - t2


def run_pass(
    root: Path,
    stats: dict[str, dict[str, ClassStats]],
    seen: dict[str, dict[bytes, int]],
    before: set[str] | None,
) -> set[str]:
    """One pass over the tree with every chunker; `seen` (chunker -> id -> stored size) is the repository.

    `before` is None for the full pass, else the paths of the full pass. Returns the paths seen."""
    cctx = zstandard.ZstdCompressor(level=1)
    paths: set[str] = set()
    for rel, p in dataset.iter_files(root):
        paths.add(rel)
        cls = dataset.file_class(rel)
        data = p.read_bytes()
        phase = "full" if before is None else "edit" if rel in before else "new"
        for ch in CHUNKERS:
            if cls in ch.classes:
                _process(ch, data, stats[ch.name][cls], seen.setdefault(ch.name, {}), cctx, phase)
    return paths


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}" if b else "-"


def tables(
    stats: dict[str, dict[str, ClassStats]], real: dict[str, int], new_files: dict[str, int], rounds: int
) -> str:
    """Markdown tables: per chunker and class, "general CDC + page mode" pairs, and throughput by stage."""
    edit_real = {c: real[c] - new_files[c] for c in CLASSES}
    out = [
        "## Per chunker and class",
        "",
        f"Full pass, then incrementals after mutate rounds 1..{rounds} (summed). *new*: chunks the",
        "incrementals add (all files); *edits*: only those of files that existed before the round (new",
        "files excluded from both sides). *real*: the change `mutate` reports.",
        "",
        "| chunker | class | MiB | chunks | mean KiB | stored MiB | x smaller | new chunks | new stored KiB "
        "| real KiB | new stored/real | edits raw/real | edits stored/real | MB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ch in CHUNKERS:
        for cls in ch.classes:
            s = stats[ch.name][cls]
            mean = s.bytes / max(1, s.refs) / KiB
            out.append(
                f"| {ch.name} | {cls} | {s.bytes / MiB:.1f} | {s.unique} | {mean:.1f} | {s.stored / MiB:.1f} "
                f"| {_ratio(s.bytes, s.stored)} | {s.new_chunks} | {s.new_with_overhead / KiB:.0f} "
                f"| {real[cls] / KiB:.0f} | {_ratio(s.new_with_overhead, real[cls])} "
                f"| {_ratio(s.edit_raw, edit_real[cls])} | {_ratio(s.edit_with_overhead, edit_real[cls])} "
                f"| {s.bytes / 1e6 / s.cpu_s:.0f} |"
            )
    out += [
        "",
        "## General CDC for text and office files, with a page mode for *.db",
        "",
        "| general | *.db | chunks | chunks/TiB | stored MiB | new stored KiB | real KiB | new stored/real "
        "| edits stored/real | db stored/real | db raw/real | MB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total_real = sum(real.values())
    total_edit = sum(edit_real.values())
    general = [ch.name for ch in CHUNKERS if ch.classes == CLASSES]
    page_modes = [ch.name for ch in CHUNKERS if ch.classes == ("db",)]
    for g in general:
        for page in [g, *page_modes]:
            parts = [stats[g]["text"], stats[g]["office"], stats[page]["db"]]
            nbytes = sum(s.bytes for s in parts)
            chunks = sum(s.unique + s.new_chunks for s in parts)
            new = sum(s.new_with_overhead for s in parts)
            edit = sum(s.edit_with_overhead for s in parts)
            cpu = sum(s.cpu_s for s in parts)
            stored = sum(s.stored for s in parts)
            db = stats[page]["db"]
            out.append(
                f"| {g} | {page} | {chunks} | {chunks * (2**40 / nbytes) / 1e6:.1f}M | {stored / MiB:.1f} "
                f"| {new / KiB:.0f} | {total_real / KiB:.0f} | {_ratio(new, total_real)} "
                f"| {_ratio(edit, total_edit)} | {_ratio(db.new_with_overhead, real['db'])} "
                f"| {_ratio(db.new_raw, real['db'])} | {nbytes / 1e6 / cpu:.0f} |"
            )
    out += [
        "",
        "## Throughput by stage (MB/s of file bytes, one core; zstd runs on distinct chunks only)",
        "",
        "| chunker | classes | cut | id (keyed BLAKE3) | zstd -1 | all three |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for ch in CHUNKERS:
        parts = [stats[ch.name][c] for c in ch.classes]
        nbytes = sum(s.bytes for s in parts)

        def rate(sec: float, n: int = nbytes) -> str:
            return f"{n / 1e6 / sec:.0f}" if sec > 0 else "-"

        out.append(
            f"| {ch.name} | {'+'.join(ch.classes)} | {rate(sum(s.cut_s for s in parts))} "
            f"| {rate(sum(s.id_s for s in parts))} | {rate(sum(s.zstd_s for s in parts))} "
            f"| {rate(sum(s.cpu_s for s in parts))} |"
        )
    return "\n".join(out)


def to_json(
    stats: dict[str, dict[str, ClassStats]], real: dict[str, int], meta: dict[str, Any]
) -> dict[str, Any]:
    rows = []
    for ch in CHUNKERS:
        for cls in ch.classes:
            s = stats[ch.name][cls]
            rows.append(
                {
                    "chunker": ch.name,
                    "class": cls,
                    "bytes": s.bytes,
                    "chunk_refs": s.refs,
                    "unique_chunks": s.unique,
                    "stored_bytes": s.stored,
                    "new_chunks": s.new_chunks,
                    "new_stored_bytes": s.new_stored,
                    "new_bytes_with_overhead": s.new_with_overhead,
                    "new_raw_bytes": s.new_raw,
                    "edit_chunks": s.edit_chunks,
                    "edit_stored_bytes": s.edit_stored,
                    "edit_raw_bytes": s.edit_raw,
                    "real_change_bytes": real[cls],
                    "cut_s": round(s.cut_s, 3),
                    "id_s": round(s.id_s, 3),
                    "zstd_s": round(s.zstd_s, 3),
                }
            )
    return {**meta, "real_change": real, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.chunking_study", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--data", type=Path, default=Path("/tmp/bench-data"))
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument(
        "--db-pages", type=int, default=None, help="page rewrites in mutate (default 1000 x scale)"
    )
    ap.add_argument("--rounds", type=int, default=1, help="mutate rounds (each one an incremental)")
    ap.add_argument("--no-generate", action="store_true", help="use --data as it is (must be un-mutated)")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "chunking_study.json")
    a = ap.parse_args(argv)

    if not a.no_generate:
        if a.data.exists():
            shutil.rmtree(a.data)
        gen = dataset.generate(a.data, a.scale)
        print(
            f"generated {gen['total_bytes'] / MiB:.1f} MiB in {gen['seconds']} s: {gen['files']}",
            file=sys.stderr,
        )
    stats: dict[str, dict[str, ClassStats]] = {
        ch.name: {c: ClassStats() for c in ch.classes} for ch in CHUNKERS
    }
    seen: dict[str, dict[bytes, int]] = {}
    t0 = time.perf_counter()
    before = run_pass(a.data, stats, seen, None)
    print(f"full pass {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    real = dict.fromkeys(CLASSES, 0)
    new_files = dict.fromkeys(CLASSES, 0)
    rounds = []
    for n in range(1, a.rounds + 1):
        mut = dataset.mutate(a.data, n, a.db_pages)
        rounds.append(mut)
        print(f"mutate: {json.dumps(mut, ensure_ascii=False)}", file=sys.stderr)
        for c in CLASSES:
            real[c] += mut["by_class"][c]
            new_files[c] += mut["new_files_by_class"][c]
        t0 = time.perf_counter()
        before = run_pass(a.data, stats, seen, before)
        print(f"incremental pass {n}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    report = tables(stats, real, new_files, a.rounds)
    print(report)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.with_suffix(".md").write_text(report + "\n")
    meta = {"data": str(a.data), "scale": a.scale, "rounds": rounds, "blob_overhead": BLOB_OVERHEAD}
    a.json.write_text(json.dumps(to_json(stats, real, meta), indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
