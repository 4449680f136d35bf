"""The position of a `log` source's tailer: what has been spooled, kept in the local state directory.

``<state.dir>/logs/<source>.json``, written temp + fsync + rename + fsync after each segment is durable in
the spool (never before): the stream, the next sequence number, the chain's head (name and keyed content id
of its plaintext), the next generation number, the last event time, and per tracked file (st_dev, st_ino,
generation, name, bytes sent, the last bytes sent, mode, mtime). Losing it only starts a new stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drsvc.core.durable import write_file

STATE_VERSION = 1

__all__ = ["Position", "TrackedFile", "load_position", "save_position"]


@dataclass
class TrackedFile:
    dev: int
    ino: int
    gen: int
    path: bytes
    offset: int = 0  # bytes sent
    tail: bytes = b""  # the last TAIL bytes sent
    mode: int = 0o644
    mtime_ns: int = 0  # at the last read: an unchanged (size, mtime) is not read again
    fd: int | None = None
    used: int = 0  # cut counter at the last growth, for closing idle descriptors
    chunks: list[tuple[bytes, int]] = field(default_factory=list)  # at the last checkpoint (in memory only)

    def to_json(self) -> dict[str, Any]:
        return {
            "dev": self.dev,
            "ino": self.ino,
            "gen": self.gen,
            "path": self.path.hex(),
            "offset": self.offset,
            "tail": self.tail.hex(),
            "mode": self.mode,
            "mtime": self.mtime_ns,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrackedFile:
        return cls(
            int(d["dev"]),
            int(d["ino"]),
            int(d["gen"]),
            bytes.fromhex(d["path"]),
            int(d["offset"]),
            bytes.fromhex(d["tail"]),
            int(d["mode"]),
            int(d["mtime"]),
        )


@dataclass
class Position:
    """What has been spooled: the stream, the next sequence number, the chain's head, every tracked file."""

    stream: str
    seq: int = 0  # the next segment's sequence number
    last: str | None = None  # name of the last spooled segment
    digest: bytes = b""  # keyed content id of its plaintext
    gen_next: int = 0
    time_ns: int = 0  # the greatest event time spooled (the clock never goes below it)
    files: dict[tuple[int, int], TrackedFile] = field(default_factory=dict)
    base: str | None = None  # the checkpoint this stream starts from (named by its segment 0)

    def to_json(self, source: str) -> bytes:
        return json.dumps(
            {
                "v": STATE_VERSION,
                "source": source,
                "stream": self.stream,
                "seq": self.seq,
                "last": self.last,
                "digest": self.digest.hex(),
                "gen_next": self.gen_next,
                "time": self.time_ns,
                "base": self.base,
                "files": [f.to_json() for f in self.files.values()],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str) -> Position:
        d = json.loads(raw)
        if d.get("v") != STATE_VERSION or d.get("source") != source:
            raise ValueError("position of another version or source")
        files = [TrackedFile.from_json(f) for f in d["files"]]
        return cls(
            str(d["stream"]),
            int(d["seq"]),
            d["last"],
            bytes.fromhex(d["digest"]),
            int(d["gen_next"]),
            int(d["time"]),
            {(f.dev, f.ino): f for f in files},
            d["base"],
        )


def load_position(path: Path, source: str) -> Position | None:
    """The saved position; None if there is none. ValueError (or KeyError, TypeError) if it is unreadable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return Position.from_json(raw, source)


def save_position(path: Path, pos: Position, source: str) -> None:
    write_file(path, pos.to_json(source))
