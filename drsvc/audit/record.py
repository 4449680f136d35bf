"""The record format: canonical JSON lines, their hash chain, the files they live in, the anchors."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes

VERSION = 1
ALGORITHMS = ("sha256", "sm3")
KEEP_MIN_S = 180 * 86400.0
FIELDS = frozenset(
    {"v", "seq", "time", "time_ns", "who", "action", "target", "result", "status", "tenant", "remote",
     "request_id", "prev", "hash"}
)  # fmt: skip
_FILE = re.compile(r"^audit-(\d{8})\.jsonl$")
HEAD, EXPIRED, REPLICATED, LOCK = "head.json", "expired.json", "replicated.json", ".lock"


def canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def digest(alg: str, data: bytes) -> str:
    """``<alg>:<hex>`` of SHA-256 or SM3."""
    if alg == "sha256":
        return "sha256:" + hashlib.sha256(data).hexdigest()
    if alg == "sm3":
        h = hashes.Hash(hashes.SM3())
        h.update(data)
        return "sm3:" + h.finalize().hex()
    raise ValueError(f"unknown audit hash {alg!r}: use one of {', '.join(ALGORITHMS)}")


def genesis(alg: str) -> str:
    return f"{alg}:" + "0" * 64


def iso(time_ns: int) -> str:
    t = dt.datetime.fromtimestamp(time_ns // 1_000_000_000, dt.UTC)
    return f"{t:%Y-%m-%dT%H:%M:%S}.{time_ns % 1_000_000_000:09d}Z"


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time_ns: int
    who: str
    action: str
    target: dict[str, Any]
    result: str
    status: int
    tenant: str | None
    remote: str | None
    request_id: str | None
    prev: str
    hash: str

    @property
    def time(self) -> str:
        return iso(self.time_ns)

    def to_json(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "seq": self.seq,
            "time": self.time,
            "time_ns": self.time_ns,
            "who": self.who,
            "action": self.action,
            "target": self.target,
            "result": self.result,
            "status": self.status,
            "tenant": self.tenant,
            "remote": self.remote,
            "request_id": self.request_id,
            "prev": self.prev,
            "hash": self.hash,
        }


def parse_record(line: bytes) -> AuditRecord:
    """A record from one line (without its newline); ValueError if it is not one in canonical form.
    Its hash is not checked here (``record_intact``)."""
    try:
        d = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not JSON") from None
    if not isinstance(d, dict) or set(d) != FIELDS or d["v"] != VERSION:
        raise ValueError("not an audit record (fields or version)")
    try:
        rec = AuditRecord(
            int_field(d["seq"]), int_field(d["time_ns"]), str_field(d["who"]), str_field(d["action"]),
            dict_field(d["target"]),
            str_field(d["result"]), int_field(d["status"]), opt_field(d["tenant"]), opt_field(d["remote"]),
            opt_field(d["request_id"]), str_field(d["prev"]), str_field(d["hash"]),
        )  # fmt: skip
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    if d["time"] != rec.time or rec.seq < 1:
        raise ValueError("time or seq out of form")
    if canonical(d) != line:
        raise ValueError("not in canonical form")
    return rec


def record_intact(rec: AuditRecord) -> bool:
    """Whether the record's ``hash`` is the hash of its content (its algorithm named in the hash)."""
    alg = rec.hash.split(":", 1)[0]
    if alg not in ALGORITHMS:
        return False
    body = rec.to_json()
    del body["hash"]
    return digest(alg, canonical(body)) == rec.hash


def int_field(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"not an integer: {v!r}")
    return v


def str_field(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(f"not a string: {v!r}")
    return v


def opt_field(v: object) -> str | None:
    return None if v is None else str_field(v)


def dict_field(v: object) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise TypeError(f"not an object: {v!r}")
    return v


# -- reading the files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One line of a log file: a record, or what could not be read as one."""

    file: str
    line: int  # 1-based
    raw: bytes  # without the newline
    record: AuditRecord | None
    error: str = ""  # why it is not a record
    torn: bool = False  # the file's last line, without a newline


def log_files(directory: Path) -> list[str]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if _FILE.fullmatch(n))


def read_lines(path: Path, limit: int | None = None) -> Iterator[Line]:
    """The lines of one file, the first `limit` bytes of it (a snapshot while it grows)."""
    with open(path, "rb") as f:
        data = f.read() if limit is None else f.read(limit)
    lines = data.split(b"\n")
    last = lines.pop()  # b"" when the file ends with a newline
    for i, raw in enumerate(lines, 1):
        yield _line(path.name, i, raw)
    if last:
        yield Line(path.name, len(lines) + 1, last, None, "the last line is cut short", torn=True)


def _line(file: str, n: int, raw: bytes) -> Line:
    try:
        return Line(file, n, raw, parse_record(raw))
    except ValueError as exc:
        return Line(file, n, raw, None, str(exc))


def read_json(path: Path) -> dict[str, Any] | None:
    """A small state file; None if absent. ValueError if it is unreadable."""
    try:
        d = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name} is unreadable: {exc}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return d


@dataclass(frozen=True)
class Anchor:
    """A point of the chain kept outside the records: the head (the newest record) or the expiry base (the
    newest record deleted by expiry)."""

    seq: int
    hash: str
    time_ns: int

    @classmethod
    def load(cls, path: Path) -> Anchor | None:
        d = read_json(path)
        if d is None:
            return None
        try:
            a = cls(int_field(d["seq"]), str_field(d["hash"]), int_field(d["time_ns"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path.name} is malformed: {exc}") from None
        if canonical(a.to_json()) != path.read_bytes():
            raise ValueError(f"{path.name} is not in canonical form")
        return a

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "time_ns": self.time_ns}
