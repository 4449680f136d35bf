"""A deterministic benchmark dataset: a department's file share in miniature (~500 MiB at scale 1.0).

    python -m benchmarks.dataset generate DIR [--scale 1.0] [--seed N] [--force]
    python -m benchmarks.dataset mutate DIR --round N

Three classes of files (see `file_class`):

- ``text``: ~10k files of a few hundred bytes to tens of KiB (lognormal), logs, configs, source code, docs
  and CSV, in a directory tree a few levels deep, some names in Chinese/Cyrillic/Latin-1. zstd -1 makes
  them 3-5x smaller, like real text.
- ``office``: ~100 zip-like containers of 100 KiB - 5 MiB: XML-ish parts (compressible) and jpeg-like
  media (random bytes, incompressible).
- ``db``: 3 database files (``*.db``, ~300 MiB together) made of 8 KiB pages: a header, line pointers, free
  space, then row tuples (structured, partly compressible); about 1% of pages are empty (zeros).

The same seed and scale give the same bytes on every run (only ``random.Random`` seeded from strings is
used; directory walks are sorted). ``mutate`` applies round N of changes (~1-2% of the data) and prints the
"real change": the bytes of new or changed content (a rewritten page counts 8 KiB, appended bytes, inserted
or replaced text, new files, rewritten ranges; deletions count 0). Rounds are deterministic given the same
prior state, i.e. apply rounds 1, 2, ... in order to a freshly generated tree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

PAGE_SIZE = 8192
DEFAULT_SEED = 20240601
MANIFEST = ".bench-dataset.json"
FORMAT_VERSION = 1

FileClass = Literal["text", "office", "db"]
PAGE_FILE_PATTERNS: tuple[str, ...] = ("*.db",)
OFFICE_EXTS = (".docx", ".xlsx", ".pptx", ".odt")
TEXT_KINDS: dict[str, tuple[str, ...]] = {
    "log": (".log", ".out"),
    "conf": (".conf", ".ini", ".yaml", ".toml", ".json", ".properties"),
    "src": (".py", ".go", ".java", ".c", ".sql", ".js", ".sh"),
    "doc": (".md", ".txt", ".csv", ".html"),
}
_EXT_KIND = {ext: kind for kind, exts in TEXT_KINDS.items() for ext in exts}

# Sizes at scale 1.0.
TEXT_FILES = 10_000
OFFICE_FILES = 100
DB_FILES_MIB = (
    ("databases/erp/orders.db", 160),
    ("databases/erp/ledger.db", 96),
    ("databases/crm/客户.db", 48),
)


def file_class(rel: str) -> FileClass:
    """Which class a path (relative, '/'-separated) belongs to."""
    base = rel.rsplit("/", 1)[-1]
    if base.endswith(".db"):
        return "db"
    if base.endswith(OFFICE_EXTS):
        return "office"
    return "text"


def iter_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every regular file under root, in a deterministic (sorted) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                yield p.relative_to(root).as_posix(), p


# ---------------------------------------------------------------------------------------------------------
# Vocabulary

_WORDS = (
    "account address agent alert archive audit backup balance batch billing buffer cache catalog channel "
    "checkpoint client cluster commit config connection consumer contract counter customer daemon database "
    "delta deploy device digest disk document domain driver email endpoint entry error event export file "
    "filter gateway group handler header health history host import index inode invoice job journal key "
    "ledger limit listener lock log manifest message metric mirror monitor mount network node notice offset "
    "order owner packet page partition payload payment peer pipeline policy pool port primary process "
    "producer profile project proxy queue quota record region release replica report request resource "
    "response restore retry role route rule schedule schema scope secret segment sequence server service "
    "session shard site snapshot socket source spool stage state status storage stream subject supplier "
    "table task tenant ticket timeout token topic trace transfer tree trigger upload user value vendor "
    "version volume worker zone"
).split()
_ZH = (
    "财务 报表 人事 档案 审计 项目 合同 会议纪要 通知 预算 采购 审批 用户 数据 系统 备份 恢复 灾备 网络 安全 "
    "监控 告警 服务 配置 部门 年度 总结 计划 办公室 信息中心 政务 公开 申请 材料"
).split()
_PEOPLE = (
    "alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy trent victor walter "
    "zhangwei wangfang lina liuyang chenjie yangmin zhaolei huangli zhouqiang wuxia sunhao maqian"
).split()
_SERVICES = (
    "nginx gateway auth billing orders inventory reporting scheduler mailer search etl postgres "
    "oa-portal archive-svc"
).split()
_CITIES = "济南 青岛 淄博 枣庄 东营 烟台 潍坊 济宁 泰安 威海 日照 临沂 德州 聊城 滨州 菏泽".split()
_DIR_EXTRA = ("Übersicht", "café", "résumé", "Проекты", "会议纪要 2024", "草稿", "old", "misc", "归档")


def _w(rng: random.Random) -> str:
    return rng.choice(_WORDS)


def _ident(rng: random.Random) -> str:
    return "_".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))


def _camel(rng: random.Random) -> str:
    return "".join(rng.choice(_WORDS).capitalize() for _ in range(rng.randint(1, 3)))


def _ip(rng: random.Random) -> str:
    return f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _hex(rng: random.Random, n: int) -> str:
    return f"{rng.getrandbits(4 * n):0{n}x}"


def _sentence(rng: random.Random, lo: int = 6, hi: int = 18) -> str:
    words = [
        rng.choice(_ZH) if rng.random() < 0.15 else rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))
    ]
    return " ".join(words).capitalize() + "."


# Line templates per text kind; each yields one line (without newline) from an rng.
_Tmpl = Callable[[random.Random], str]

_LOG_MSGS: tuple[_Tmpl, ...] = (
    lambda r: (
        f"GET /api/v1/{_w(r)}s/{r.randrange(10**6)} {r.choice((200, 200, 200, 201, 304, 404, 500))} "
        f"{r.randrange(1, 900)}ms ip={_ip(r)} req={_hex(r, 12)}"
    ),
    lambda r: f"user {r.choice(_PEOPLE)} logged in from {_ip(r)} session={_hex(r, 16)}",
    lambda r: (
        f"query took {r.randrange(1, 5000)} ms: SELECT {_ident(r)}, {_ident(r)} FROM {_ident(r)} "
        f"WHERE id = {r.randrange(10**7)}"
    ),
    lambda r: f"cache miss key={_w(r)}:{r.randrange(10**6)} backend={r.choice(_SERVICES)}-{r.randrange(8)}",
    lambda r: (
        f"job {_ident(r)}#{r.randrange(10**5)} finished status={r.choice(('ok', 'ok', 'failed', 'retry'))} "
        f"rows={r.randrange(10**6)} elapsed={r.random() * 100:.3f}s"
    ),
    lambda r: (
        f"connection to {r.choice(_SERVICES)}:{r.randrange(1024, 65535)} reset by peer, "
        f"retry {r.randint(1, 5)}/5"
    ),
    lambda r: (
        f"用户 {r.choice(_PEOPLE)} 提交了{r.choice(_ZH)}审批 编号={r.randrange(10**8)} 状态={r.choice(_ZH)}"
    ),
    lambda r: f"{_camel(r)}Exception: {_sentence(r, 4, 9)} at {_ident(r)}.py:{r.randrange(2000)}",
    lambda r: (
        f"checkpoint complete: wrote {r.randrange(10**5)} buffers ({r.random() * 10:.1f}%); lsn={_hex(r, 8)}"
    ),
)
_CONF_LINES: tuple[_Tmpl, ...] = (
    lambda r: f"[{_ident(r)}]",
    lambda r: f"{_ident(r)} = {r.randrange(10**5)}",
    lambda r: f"{_ident(r)}.{_ident(r)} = {r.choice(('true', 'false', 'on', 'off', 'auto'))}",
    lambda r: f'  {_ident(r)}: "{r.choice(_SERVICES)}.{_w(r)}.internal:{r.randrange(1024, 65535)}"',
    lambda r: f'    "{_ident(r)}": "{_hex(r, r.choice((8, 16, 32)))}",',
    lambda r: f"# {_sentence(r)}",
    lambda r: f"{_ident(r)}_path = /var/lib/{r.choice(_SERVICES)}/{_ident(r)}/{_w(r)}.dat",
    lambda r: f"{_ident(r)}_timeout_ms = {r.randrange(100, 120000)}",
)
_SRC_LINES: tuple[_Tmpl, ...] = (
    lambda r: f"    def {_ident(r)}(self, {_ident(r)}: {_camel(r)}) -> {_camel(r)} | None:",
    lambda r: f"        {_ident(r)} = self.{_ident(r)}.get({_w(r)!r}, {r.randrange(1000)})",
    lambda r: f"        if {_ident(r)} is None or len({_ident(r)}) > {r.randrange(4096)}:",
    lambda r: f'            raise {_camel(r)}Error("{_sentence(r, 3, 7)}")',
    lambda r: f"        return {_ident(r)}({_ident(r)}, {_ident(r)}={r.randrange(100)})",
    lambda r: f"from {_ident(r)}.{_ident(r)} import {_camel(r)}, {_ident(r)}",
    lambda r: f"    # {_sentence(r)}",
    lambda r: (
        f"func ({_w(r)[0]} *{_camel(r)}) {_camel(r)}(ctx context.Context, {_w(r)} {_camel(r)}) error {{"
    ),
    lambda r: f"\tif err := {_w(r)[0]}.{_camel(r)}(ctx, {r.randrange(64)}); err != nil {{",
    lambda r: f'\t\treturn fmt.Errorf("{_ident(r)} {_w(r)}: %w", err)',
    lambda r: "\t}",
    lambda r: "",
    lambda r: f"    private final {_camel(r)} {_ident(r)} = new {_camel(r)}({r.randrange(1000)});",
    lambda r: (
        f"SELECT {_ident(r)}, count(*) FROM {_ident(r)} WHERE {_ident(r)} > {r.randrange(10**6)} GROUP BY 1;"
    ),
    lambda r: f"static int {_ident(r)}(struct {_ident(r)} *{_w(r)}, size_t {_w(r)}_len);",
)
_DOC_LINES: tuple[_Tmpl, ...] = (
    lambda r: _sentence(r, 8, 24),
    lambda r: f"## {r.choice(_ZH)}{r.choice(_ZH)} {_w(r)} {r.randrange(1, 20)}",
    lambda r: (
        f"{r.randrange(10**6)},{r.choice(_PEOPLE)},{r.choice(_CITIES)},"
        f"2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d},{r.random() * 10**5:.2f},{r.choice(_ZH)}"
    ),
    lambda r: f"- {r.choice(_ZH)}：{_sentence(r, 3, 10)}",
    lambda r: (
        f"<tr><td>{r.choice(_PEOPLE)}</td><td>{r.choice(_CITIES)}</td><td>{r.randrange(10**5)}</td></tr>"
    ),
    lambda r: "".join(r.choice(_ZH) for _ in range(r.randint(6, 20))) + "。",
)
_XML_LINES: tuple[_Tmpl, ...] = (
    lambda r: (
        f'<w:p><w:pPr><w:pStyle w:val="{_camel(r)}"/></w:pPr>'
        f'<w:r><w:t xml:space="preserve">{_sentence(r)}</w:t></w:r></w:p>'
    ),
    lambda r: (
        f'<row r="{r.randrange(1, 10**5)}"><c r="A{r.randrange(1, 10**5)}" t="s">'
        f'<v>{r.randrange(5000)}</v></c><c r="B{r.randrange(1, 10**5)}">'
        f"<v>{r.random() * 10**4:.4f}</v></c></row>"
    ),
    lambda r: f"<a:t>{''.join(r.choice(_ZH) for _ in range(r.randint(3, 12)))}</a:t>",
    lambda r: f'<w:rPr><w:b/><w:sz w:val="{r.randrange(16, 40)}"/><w:color w:val="{_hex(r, 6)}"/></w:rPr>',
)


@dataclass
class _Pools:
    log: list[str]
    conf: list[str]
    src: list[str]
    doc: list[str]
    xml: list[str]
    rows: list[bytes]

    def lines(self, kind: str) -> list[str]:
        pool: list[str] = getattr(self, kind)
        return pool


def _build_pools(seed: int, salt: str = "") -> _Pools:
    r = random.Random(f"{seed}:pools{salt}")

    def pool(tmpls: tuple[_Tmpl, ...], n: int) -> list[str]:
        return [r.choice(tmpls)(r) for _ in range(n)]

    rows = []
    for _ in range(6000):
        status = r.choice(("NEW", "PAID", "SHIPPED", "CANCELLED", "REFUNDED", "待审批", "已归档"))
        who = f"{r.choice(_PEOPLE)}@{r.choice(_CITIES)}"
        note = _sentence(r, 1, 14) if r.random() < 0.7 else ""
        rows.append("|".join((status, who, note)).encode())
    return _Pools(
        log=pool(_LOG_MSGS, 6000),
        conf=pool(_CONF_LINES, 3000),
        src=pool(_SRC_LINES, 6000),
        doc=pool(_DOC_LINES, 4000),
        xml=pool(_XML_LINES, 4000),
        rows=rows,
    )


# ---------------------------------------------------------------------------------------------------------
# Content generators


LOCAL_FRACTION = 0.5
_LEVELS = ("INFO",) * 12 + ("DEBUG",) * 4 + ("WARN",) * 2 + ("ERROR",)


def _local(r: random.Random, pool: list[str], k: int) -> list[str]:
    """The lines one file draws from: a few per output line, so that lines recur as in real text."""
    return r.choices(pool, k=max(3, int(k * LOCAL_FRACTION)))


def _log_lines(r: random.Random, pools: _Pools, size: int, start_ms: int) -> bytes:
    """Log lines of about `size` bytes, timestamps increasing from start_ms."""
    out: list[str] = []
    total = 0
    ts = start_ms
    while total < size:
        k = max(4, (size - total) // 110 + 1)
        msgs = r.choices(_local(r, pools.log, k), k=k)
        steps = r.choices(range(1, 4000), k=k)
        levels = r.choices(_LEVELS, k=k)
        threads = r.choices(range(32), k=k)
        for msg, step, level, th in zip(msgs, steps, levels, threads, strict=True):
            ts += step
            sec, ms = divmod(ts, 1000)
            line = (
                f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(sec))}.{ms:03d}Z {level} [w-{th}] {msg}\n"
            )
            out.append(line)
            total += len(line)
            if total >= size:
                break
    return "".join(out).encode()


def _pool_text(r: random.Random, pool: list[str], size: int) -> bytes:
    out: list[str] = []
    total = 0
    while total < size:
        k = max(4, (size - total) // 50 + 1)
        for line in r.choices(_local(r, pool, k), k=k):
            out.append(line)
            total += len(line) + 1
            if total >= size:
                break
    out.append("")
    return "\n".join(out).encode()


def _text_body(r: random.Random, pools: _Pools, kind: str, size: int) -> bytes:
    if kind == "log":
        return _log_lines(r, pools, size, 1_700_000_000_000 + r.randrange(10**10))
    return _pool_text(r, pools.lines(kind), size)


def _text_size(r: random.Random, kind: str) -> int:
    median = 8000 if kind == "log" else 2600
    return int(min(96 * 1024, max(200, r.lognormvariate(math.log(median), 1.0))))


_JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def _media(r: random.Random, size: int) -> bytes:
    return (_JPEG_HEAD + r.randbytes(max(0, size - len(_JPEG_HEAD))))[:size]


def _xml(r: random.Random, pools: _Pools, size: int) -> bytes:
    head = b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<w:document><w:body>\n'
    return (head + _pool_text(r, pools.xml, size))[:size]


def _office_body(r: random.Random, pools: _Pools, size: int, ext: str) -> bytes:
    """A zip-like container: local headers + stored parts (XML-ish or jpeg-like media) + central directory."""
    media_frac = r.uniform(0.2, 0.9)
    xml_total = int(size * (1 - media_frac))
    media_total = size - xml_total
    main = {".docx": "word/document.xml", ".xlsx": "xl/worksheets/sheet1.xml"}.get(
        ext, "ppt/slides/slide1.xml"
    )
    parts: list[tuple[str, bytes]] = [("[Content_Types].xml", _xml(r, pools, 1200 + r.randrange(800)))]
    n_xml = r.randint(1, 3)
    for i in range(n_xml):
        name = main if i == 0 else main.replace("1", str(i + 1))
        parts.append((name, _xml(r, pools, max(256, xml_total // n_xml))))
    n_media = r.randint(1, 6)
    for i in range(n_media):
        parts.append((f"media/image{i + 1}.jpeg", _media(r, max(256, media_total // n_media))))
    parts.append(("styles.xml", _xml(r, pools, 2000 + r.randrange(6000))))
    out = bytearray()
    central = bytearray()
    for name, data in parts:
        nb = name.encode()
        crc = r.getrandbits(32)
        central += struct.pack("<4sIII", b"PK\x01\x02", crc, len(data), len(out)) + nb
        out += struct.pack("<4sHHHIII", b"PK\x03\x04", 20, 0, 0, crc, len(data), len(nb)) + nb + data
    out += central + struct.pack("<4sHI", b"PK\x05\x06", len(parts), len(central))
    return bytes(out)


_ROW = struct.Struct("<IIIIHHHBxqqd16sH")  # tuple header (24 bytes) + id, ts, amount, uuid, text length


def _page(r: random.Random, pools: _Pools, block: int, lsn: int, first_row: int) -> tuple[bytes, int]:
    """One 8 KiB heap page: header, line pointers, free space (zeros), tuples from the end. (page, rows)."""
    if r.random() < 0.01:
        return bytes(PAGE_SIZE), 0
    room = int((PAGE_SIZE - 24) * r.uniform(0.55, 0.97))
    texts = r.choices(pools.rows, k=80)
    uuids = r.randbytes(16 * 80)
    xmin = 1_000_000 + (lsn >> 8) % 10**8
    tuples: list[bytes] = []
    used = 0
    for i, text in enumerate(texts):
        row_id = first_row + i
        t = _ROW.pack(
            xmin + r.randrange(5000),
            0,
            0,
            block,
            i + 1,
            7,
            0x0902,
            24,
            row_id,
            1_700_000_000_000_000 + row_id * 37_000,
            round(r.random() * 10**5, 2),
            uuids[16 * i : 16 * i + 16],
            len(text),
        )
        t += text
        t += bytes(-len(t) % 8)
        if used + len(t) + 4 > room:
            break
        tuples.append(t)
        used += len(t) + 4
    n = len(tuples)
    lower = 24 + 4 * n
    upper = PAGE_SIZE - (used - 4 * n)
    lps = bytearray()
    off = PAGE_SIZE
    for t in tuples:
        off -= len(t)
        lps += struct.pack("<I", off | (1 << 15) | (len(t) << 17))
    header = struct.pack(
        "<QHHHHHHI", lsn, (block * 40503 ^ lsn) & 0xFFFF, 0, lower, upper, PAGE_SIZE, 0x2004, 0
    )
    page = header + lps + bytes(upper - lower) + b"".join(reversed(tuples))
    assert len(page) == PAGE_SIZE
    return page, n


def _write_db(path: Path, r: random.Random, pools: _Pools, n_pages: int) -> None:
    row = 1
    with open(path, "wb") as f:
        batch: list[bytes] = []
        for block in range(n_pages):
            page, n = _page(r, pools, block, 0x1_0000_0000 + block * 977, row)
            row += n
            batch.append(page)
            if len(batch) == 512:
                f.write(b"".join(batch))
                batch.clear()
        f.write(b"".join(batch))


# ---------------------------------------------------------------------------------------------------------
# Layout


def _dirs(r: random.Random) -> dict[str, list[str]]:
    """Directories per content kind."""
    out: dict[str, list[str]] = {k: [] for k in (*TEXT_KINDS, "office")}
    for svc in _SERVICES:
        for year in (2023, 2024):
            for month in r.sample(range(1, 13), 3):
                out["log"].append(f"var/log/{svc}/{year}/{month:02d}")
        out["conf"].append(f"etc/{svc}")
        out["conf"].append(f"etc/{svc}/conf.d")
    for _ in range(14):
        proj = _ident(r).replace("_", "-")
        for _ in range(r.randint(2, 6)):
            pkg = f"src/{proj}/{_w(r)}"
            out["src"].append(pkg)
            out["src"].append(f"{pkg}/{_w(r)}/{_w(r)}")
    for person in _PEOPLE:
        home = f"home/{person}"
        for top in r.sample(("文档", "Documents", "下载", "Desktop", "工作"), 2):
            out["doc"].append(f"{home}/{top}")
            out["office"].append(f"{home}/{top}")
            sub = f"{home}/{top}/{r.choice(_DIR_EXTRA)}/{r.choice(_ZH)}"
            out["doc"].append(sub)
            out["office"].append(sub)
    for dept in ("财务处", "人事处", "办公室", "信息中心", "审计科"):
        for year in (2022, 2023, 2024):
            d = f"shared/部门-{dept}/{year}"
            out["doc"].append(d)
            out["office"].append(d)
            out["office"].append(f"{d}/{r.choice(_ZH)}{r.choice(_ZH)}")
    return {k: sorted(set(v)) for k, v in out.items()}


def _kind_of(r: random.Random) -> str:
    return r.choices(("log", "conf", "src", "doc"), weights=(25, 15, 35, 25))[0]


def _text_name(r: random.Random, kind: str, i: int) -> str:
    ext = r.choice(TEXT_KINDS[kind])
    stem = r.choice(_ZH) + r.choice(_ZH) if r.random() < 0.1 else _ident(r)
    return f"{stem}-{i}{ext}"


@dataclass(frozen=True)
class Scale:
    text_files: int
    office_files: int
    db_pages: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, scale: float) -> Scale:
        pages = tuple(
            (name, max(16, round(mib * scale * 1024 * 1024 / PAGE_SIZE))) for name, mib in DB_FILES_MIB
        )
        return cls(max(20, round(TEXT_FILES * scale)), max(3, round(OFFICE_FILES * scale)), pages)


def generate(root: Path, scale: float = 1.0, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Create the dataset under root (which must be empty or absent). Returns a summary."""
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    sc = Scale.of(scale)
    pools = _build_pools(seed)
    r = random.Random(f"{seed}:layout")
    dirs = _dirs(r)
    sizes: dict[str, int] = {"text": 0, "office": 0, "db": 0}
    counts: dict[str, int] = {"text": 0, "office": 0, "db": 0}

    def write(rel: str, data: bytes) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        c = file_class(rel)
        sizes[c] += len(data)
        counts[c] += 1

    for i in range(sc.text_files):
        kind = _kind_of(r)
        rel = f"{r.choice(dirs[kind])}/{_text_name(r, kind, i)}"
        fr = random.Random(f"{seed}:text:{rel}")
        write(rel, _text_body(fr, pools, kind, _text_size(fr, kind)))
    for i in range(sc.office_files):
        ext = r.choice(OFFICE_EXTS)
        stem = f"{r.choice(_ZH)}{r.choice(_ZH)}-{i}" if r.random() < 0.5 else f"{_ident(r)}-{i}"
        rel = f"{r.choice(dirs['office'])}/{stem}{ext}"
        fr = random.Random(f"{seed}:office:{rel}")
        size = int(math.exp(fr.uniform(math.log(100 * 1024), math.log(5 * 1024 * 1024))))
        write(rel, _office_body(fr, pools, size, ext))
    for rel, n_pages in sc.db_pages:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        _write_db(p, random.Random(f"{seed}:db:{rel}"), pools, n_pages)
        sizes["db"] += n_pages * PAGE_SIZE
        counts["db"] += 1
    (root / MANIFEST).write_text(json.dumps({"version": FORMAT_VERSION, "seed": seed, "scale": scale}) + "\n")
    return {
        "root": str(root),
        "scale": scale,
        "seed": seed,
        "files": counts,
        "bytes": sizes,
        "total_bytes": sum(sizes.values()),
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ---------------------------------------------------------------------------------------------------------
# Mutation


def _read_manifest(root: Path) -> dict[str, Any]:
    try:
        m: dict[str, Any] = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise SystemExit(f"{root} is not a generated dataset (no {MANIFEST})") from None
    return m


def mutate(root: Path, round_no: int, db_pages: int | None = None) -> dict[str, Any]:
    """Apply round `round_no` of changes to a generated dataset; returns the real change (see module doc).

    `db_pages` overrides the number of scattered page rewrites (default 1000 at scale 1.0)."""
    m = _read_manifest(root)
    seed, scale = int(m["seed"]), float(m["scale"])
    pools = _build_pools(seed, f":round{round_no}")
    r = random.Random(f"{seed}:mutate:{round_no}")
    files = [(rel, p) for rel, p in iter_files(root) if rel != MANIFEST]
    by_class: dict[str, list[tuple[str, Path]]] = {"text": [], "office": [], "db": []}
    for rel, p in files:
        by_class[file_class(rel)].append((rel, p))
    real = {"text": 0, "office": 0, "db": 0}
    new_files = {"text": 0, "office": 0, "db": 0}  # the part of `real` that is whole new files
    ops: dict[str, int] = {}

    def n_of(base: int, lo: int = 1) -> int:
        return max(lo, round(base * scale))

    # -- text: appends to logs, edits (replace/insert lines), new files, deletions
    text = by_class["text"]
    logs = [fp for fp in text if _EXT_KIND.get(Path(fp[0]).suffix) == "log"]
    others = [fp for fp in text if _EXT_KIND.get(Path(fp[0]).suffix, "log") != "log"]
    touched: set[str] = set()
    for rel, p in r.sample(logs, min(len(logs), n_of(60))):
        data = _log_lines(
            r, pools, r.randint(512, 8192), 1_800_000_000_000 + round_no * 10**8 + r.randrange(10**7)
        )
        with open(p, "ab") as f:
            f.write(data)
        real["text"] += len(data)
        touched.add(rel)
    ops["text_appended"] = len(touched)
    edited = 0
    for rel, p in r.sample(others, min(len(others), n_of(40))):
        kind = _EXT_KIND.get(p.suffix, "doc")
        lines = p.read_bytes().split(b"\n")
        at = r.randrange(len(lines))
        new = [line.encode() for line in r.choices(pools.lines(kind), k=r.randint(1, 4))]
        drop = r.choice((0, 0, 1, 2))
        lines[at : at + drop] = new
        p.write_bytes(b"\n".join(lines))
        real["text"] += sum(len(x) + 1 for x in new)
        touched.add(rel)
        edited += 1
    ops["text_edited"] = edited
    text_dirs = sorted({rel.rsplit("/", 1)[0] for rel, _ in text if "/" in rel})
    for i in range(n_of(30)):
        kind = _kind_of(r)
        rel = f"{r.choice(text_dirs)}/r{round_no}-{_text_name(r, kind, i)}"
        data = _text_body(r, pools, kind, _text_size(r, kind))
        (root / rel).write_bytes(data)
        real["text"] += len(data)
        new_files["text"] += len(data)
    ops["text_added"] = n_of(30)
    untouched = [fp for fp in text if fp[0] not in touched]
    for _rel, p in r.sample(untouched, min(len(untouched), n_of(15))):
        p.unlink()
    ops["text_deleted"] = min(len(untouched), n_of(15))

    # -- office: in-place range rewrites, one insertion (the file grows), one new file
    office = by_class["office"]
    picks = r.sample(office, min(len(office), n_of(3) + 1))
    for _rel, p in picks[:-1]:
        size = p.stat().st_size
        length = min(size // 2, r.randint(64 * 1024, 256 * 1024))
        off = r.randrange(0, size - length + 1)
        data = _media(r, length) if r.random() < 0.5 else _xml(r, pools, length)
        with open(p, "r+b") as fr:
            fr.seek(off)
            fr.write(data)
        real["office"] += length
    ops["office_rewritten"] = len(picks) - 1
    if picks:
        p = picks[-1][1]
        old = p.read_bytes()
        at = r.randrange(len(old) // 4, 3 * len(old) // 4)
        data = _xml(r, pools, r.randint(16 * 1024, 64 * 1024))
        p.write_bytes(old[:at] + data + old[at:])
        real["office"] += len(data)
        ops["office_inserted"] = 1
    if scale >= 0.5:
        ext = r.choice(OFFICE_EXTS)
        rel = f"{r.choice(office)[0].rsplit('/', 1)[0]}/r{round_no}-new-{_ident(r)}{ext}"
        data = _office_body(r, pools, r.randint(200 * 1024, 2 * 1024 * 1024), ext)
        (root / rel).write_bytes(data)
        real["office"] += len(data)
        new_files["office"] += len(data)
        ops["office_added"] = 1

    # -- db: scattered page rewrites in place, plus growth of the largest file
    dbs = by_class["db"]
    if dbs:
        spans = [(p, p.stat().st_size // PAGE_SIZE) for _, p in dbs]
        total_pages = sum(n for _, n in spans)
        n_pages = n_of(1000, 8) if db_pages is None else db_pages
        chosen = sorted(r.sample(range(total_pages), min(total_pages, n_pages)))
        lsn = 0x2_0000_0000 + round_no * 0x1000_0000
        base = 0
        for p, n in spans:
            mine = [g - base for g in chosen if base <= g < base + n]
            base += n
            with open(p, "r+b") as fr:
                for block in mine:
                    lsn += r.randrange(1, 4096)
                    page, _ = _page(r, pools, block, lsn, 50_000_000 + round_no * 10**6 + block * 100)
                    fr.seek(block * PAGE_SIZE)
                    fr.write(page)
        real["db"] += len(chosen) * PAGE_SIZE
        ops["db_pages_rewritten"] = len(chosen)
        biggest, n = max(spans, key=lambda s: s[1])
        grow = n_of(64)
        with open(biggest, "ab") as f:
            for block in range(n, n + grow):
                lsn += r.randrange(1, 4096)
                page, _ = _page(r, pools, block, lsn, 60_000_000 + round_no * 10**6 + block * 100)
                f.write(page)
        real["db"] += grow * PAGE_SIZE
        ops["db_pages_appended"] = grow

    total = sum(p.stat().st_size for _, p in iter_files(root))
    change = sum(real.values())
    return {
        "round": round_no,
        "real_change_bytes": change,
        "by_class": real,
        "new_files_by_class": new_files,
        "ops": ops,
        "dataset_bytes": total,
        "change_fraction": round(change / total, 4) if total else 0.0,
    }


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dataset", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="create the dataset in DIR")
    g.add_argument("dir", type=Path)
    g.add_argument("--scale", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=DEFAULT_SEED)
    g.add_argument("--force", action="store_true", help="delete DIR first if it exists")
    mu = sub.add_parser("mutate", help="apply round N of changes to DIR")
    mu.add_argument("dir", type=Path)
    mu.add_argument("--round", type=int, required=True, dest="round_no")
    mu.add_argument("--db-pages", type=int, default=None, help="page rewrites (default 1000 x scale)")
    a = ap.parse_args(argv)
    if a.cmd == "generate":
        if a.dir.exists() and any(a.dir.iterdir()):
            if not a.force:
                print(f"{a.dir} is not empty (use --force to replace it)", file=sys.stderr)
                return 2
            shutil.rmtree(a.dir)
        print(json.dumps(generate(a.dir, a.scale, a.seed), ensure_ascii=False))
    else:
        print(json.dumps(mutate(a.dir, a.round_no, a.db_pages), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
