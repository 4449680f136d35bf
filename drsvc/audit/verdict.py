"""What ``verify`` finds: each problem named by file, line and seq (and site), and the checks that find
them in the local files."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from drsvc.audit.record import ALGORITHMS, EXPIRED, HEAD, Anchor, Line, genesis, iso, record_intact


class Issue(enum.StrEnum):
    """Kinds of finding."""

    MODIFIED = "modified"  # a record's content does not match its hash, or differs from a site's copy
    REMOVED = "removed"  # records missing: a gap, the oldest, or the newest (head anchor, a site's copy)
    BROKEN_LINK = "broken-link"  # prev is not the previous record's hash: a record replaced
    REORDERED = "reordered"
    DUPLICATE = "duplicate"
    UNREADABLE = "unreadable"  # a line that is not a record where the chain breaks
    TORN = "torn"  # warning: a line cut short by a crash (never acknowledged)
    ANCHOR = "anchor"  # head.json or expired.json unreadable, or disagreeing with the records
    SITE_MISSING = "site-missing"  # records shipped to a site that it does not hold
    SITE_CORRUPT = "site-corrupt"  # a batch at a site that does not open
    SITE_DIFFERS = "site-differs"  # two copies of one record at the sites differ
    NOT_REPLICATED = "not-replicated"  # warning: records not yet at a site, or no replication configured
    UNREACHABLE = "unreachable"  # warning: a site could not be read


@dataclass(frozen=True)
class AuditFinding:
    kind: Issue
    detail: str
    file: str = ""
    line: int = 0
    seq: int = 0
    site: str = ""
    warning: bool = False

    def where(self) -> str:
        parts = [f"{self.file}:{self.line}" if self.file else "", f"seq {self.seq}" if self.seq else ""]
        parts.append(f"site {self.site}" if self.site else "")
        return " ".join(p for p in parts if p)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "detail": self.detail,
            "file": self.file,
            "line": self.line,
            "seq": self.seq,
            "site": self.site,
            "warning": self.warning,
        }


@dataclass
class AuditVerdict:
    directory: str
    files: int = 0
    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    findings: list[AuditFinding] = field(default_factory=list)
    replicated: bool | None = None  # None: the sites were not consulted
    sites: dict[str, int] = field(default_factory=dict)  # site -> newest seq it holds

    @property
    def problems(self) -> list[AuditFinding]:
        return [f for f in self.findings if not f.warning]

    @property
    def warnings(self) -> list[AuditFinding]:
        return [f for f in self.findings if f.warning]

    @property
    def intact(self) -> bool:
        return not self.problems

    def add(self, kind: Issue, detail: str, *, warning: bool = False, **where: Any) -> None:
        self.findings.append(AuditFinding(kind, detail, warning=warning, **where))

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "intact": self.intact,
            "files": self.files,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "replicated": self.replicated,
            "sites": self.sites,
            "findings": [f.to_json() for f in self.findings],
        }


def ranges(seqs: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def span(a: int, b: int) -> str:
    return f"seq {a}" if a == b else f"seqs {a}..{b}"


@dataclass
class Scan:
    files: int
    lines: list[Line]
    head: Anchor | None
    base: Anchor | None
    errors: list[str]  # anchors that could not be read

    @property
    def records(self) -> dict[int, Line]:
        """Seq -> its first line (duplicates are findings)."""
        out: dict[int, Line] = {}
        for ln in self.lines:
            if ln.record is not None:
                out.setdefault(ln.record.seq, ln)
        return out


def check_scan(scan: Scan, verdict: AuditVerdict, keep_s: float, now_ns: int) -> None:
    """Every local finding: records, chain, order, anchors."""
    recs = [ln for ln in scan.lines if ln.record is not None]
    verdict.records = len(recs)
    by_seq = scan.records
    if by_seq:
        verdict.first_seq, verdict.last_seq = min(by_seq), max(by_seq)
    for err in scan.errors:
        verdict.add(Issue.ANCHOR, err)

    seen: dict[int, Line] = {}
    newest: Line | None = None
    for ln in recs:
        r = ln.record
        assert r is not None
        at: dict[str, Any] = {"file": ln.file, "line": ln.line, "seq": r.seq}
        if not record_intact(r):
            verdict.add(Issue.MODIFIED, "the record's content does not match its hash", **at)
        if r.seq in seen:
            first = seen[r.seq]
            what = "a copy of" if first.raw == ln.raw else "another record with the seq of"
            verdict.add(Issue.DUPLICATE, f"{what} {first.file}:{first.line}", **at)
            continue
        seen[r.seq] = ln
        if newest is not None and newest.record is not None and r.seq < newest.record.seq:
            verdict.add(
                Issue.REORDERED,
                f"comes after seq {newest.record.seq} ({newest.file}:{newest.line})",
                **at,
            )
        if newest is None or (newest.record is not None and r.seq > newest.record.seq):
            newest = ln

    # the chain, in seq order
    base = scan.base
    lo = base.seq + 1 if base is not None else 1
    seqs = sorted(by_seq)
    missing = [s for s in range(lo, seqs[-1] + 1) if s not in by_seq] if seqs else []
    bad = [ln for ln in scan.lines if ln.record is None and not ln.torn]
    for a, b in ranges(missing):
        after = by_seq.get(b + 1)
        what = f"{span(a, b)} missing"
        if after is not None:
            what += f" (before {after.file}:{after.line})"
            near = [f"{x.file}:{x.line}" for x in bad if (x.file, x.line) < (after.file, after.line)]
            if near:
                what += f"; unreadable lines before it: {', '.join(near[-3:])} (a modified record?)"
        where: dict[str, Any] = {"file": after.file, "line": after.line} if after is not None else {}
        verdict.add(Issue.REMOVED, what, seq=a, **where)
    for s in seqs:
        ln = by_seq[s]
        r = ln.record
        assert r is not None
        at = {"file": ln.file, "line": ln.line, "seq": s}
        if s == 1 and base is None:
            alg = r.prev.split(":", 1)[0]
            if alg not in ALGORITHMS or r.prev != genesis(alg):
                verdict.add(Issue.BROKEN_LINK, "the first record's prev is not the genesis value", **at)
            continue
        prev_line = by_seq.get(s - 1)
        if prev_line is not None and prev_line.record is not None:
            if r.prev != prev_line.record.hash:
                verdict.add(
                    Issue.BROKEN_LINK,
                    f"prev is not the hash of seq {s - 1} ({prev_line.file}:{prev_line.line}): "
                    "a record was replaced",
                    **at,
                )
        elif base is not None and s == base.seq + 1 and r.prev != base.hash:
            verdict.add(Issue.BROKEN_LINK, f"prev is not the hash in {EXPIRED} (seq {base.seq})", **at)
    if base is not None:
        if base.seq in by_seq and by_seq[base.seq].record is not None:
            r0 = by_seq[base.seq].record
            assert r0 is not None
            if r0.hash != base.hash:
                verdict.add(Issue.ANCHOR, f"{EXPIRED} names another hash for seq {base.seq}", seq=base.seq)
        if base.time_ns > now_ns - int(keep_s * 1e9):
            verdict.add(
                Issue.REMOVED,
                f"{EXPIRED} says records up to seq {base.seq} expired, but the newest of them is from "
                f"{iso(base.time_ns)}, younger than the retention ({keep_s / 86400:g} days)",
                seq=base.seq,
            )

    # unreadable lines where the chain is continuous across them: a torn write ended by the next append
    for ln in bad:
        prev_rec = next((x.record for x in reversed(recs) if (x.file, x.line) < (ln.file, ln.line)), None)
        next_rec = next((x.record for x in recs if (x.file, x.line) > (ln.file, ln.line)), None)
        continuous = (
            prev_rec is not None and next_rec is not None
            and next_rec.seq == prev_rec.seq + 1 and next_rec.prev == prev_rec.hash
        )  # fmt: skip
        if continuous:
            verdict.add(
                Issue.TORN,
                f"an unreadable line ({ln.error}) between two consecutive records: a write cut by a crash",
                file=ln.file,
                line=ln.line,
                warning=True,
            )
        else:
            verdict.add(Issue.UNREADABLE, f"not a record: {ln.error}", file=ln.file, line=ln.line)
    for ln in scan.lines:
        if ln.torn:
            last_file = ln.file == (scan.lines[-1].file if scan.lines else "")
            verdict.add(
                Issue.TORN,
                "the last line is cut short: a write interrupted by a crash (never acknowledged)"
                + ("" if last_file else "; records continue in a later file"),
                file=ln.file,
                line=ln.line,
                warning=True,
            )

    # the head anchor: the newest record written
    head = scan.head
    if head is not None:
        have = by_seq.get(head.seq)
        top = seqs[-1] if seqs else (base.seq if base else 0)
        if head.seq > top:
            verdict.add(
                Issue.REMOVED,
                f"the newest records {span(top + 1, head.seq)} are gone: {HEAD} names seq {head.seq}",
                seq=top + 1,
            )
        elif (
            have is not None
            and have.record is not None
            and (have.record.hash != head.hash or have.record.time_ns != head.time_ns)
        ):
            verdict.add(
                Issue.MODIFIED,
                f"differs from {HEAD} (the hash written with it)",
                file=have.file,
                line=have.line,
                seq=head.seq,
            )
    elif seqs:
        verdict.add(Issue.ANCHOR, f"{HEAD} is missing (it is written with every record)")
