"""The audit log of mutating API requests: append-only, hash-chained, kept, replicated sealed.

1. ``AuditLog.append`` writes one record (who, what, when, result) as one line of canonical JSON (sorted keys,
   no spaces, ASCII) to ``audit-YYYYMMDD.jsonl`` (the UTC day; never an earlier file than the last one), with
   ``O_APPEND``, and fsyncs it before it returns. ``hash`` is ``<alg>:<hex>`` of SHA-256 or SM3 over the
   canonical JSON of the record without ``hash``; ``prev`` is the previous record's ``hash`` (the first
   record's: ``<alg>:`` and 64 zeros). Then ``head.json`` (the last seq and hash) is replaced: removing the
   newest records shows against it. A line cut by a crash is ended with a newline before the next record.
2. ``verify`` reads every file and names each problem by file, line and seq: a record whose content does not
   match its hash (modified), a gap in the seqs or a ``prev`` that is not the previous record's hash
   (removed, replaced), records out of order, unreadable lines, and disagreement with the head and expiry
   anchors. A final line cut short (a crash during a write, never acknowledged) is a warning.
3. ``expire`` deletes the oldest files whose records are all older than ``keep``, never the newest, after
   writing ``expired.json`` (seq, hash and time of the last record deleted): the first kept record's
   ``prev`` matches it, so ``verify`` does not report the deleted ones as removed.
4. ``replicate`` seals the records each site of the audit tenant has not received yet as audit batches
   (docs/FORMAT.md section 20, ``<tenant>/audit/<keyed content id>``) and puts them there, then advances that
   site's watermark in ``replicated.json``. A crash between the two ships the batch again (same name, same
   bytes: the seal is deterministic).
5. ``verify_with_sites`` opens every batch at the sites and compares: a record a site holds that is missing
   here (removed from the end, or anywhere), or different here (edited and re-chained by someone who
   rewrote the files and the anchors), and records a site should hold but does not.

Only the sites' copies resist someone who can rewrite the files: the chain and the anchors are plain hashes
in the same directory (docs/AUDIT.md).

Modules: ``record`` (the line format, the chain's hash, files and anchors), ``log`` (``AuditLog``: 1-3 and the
watermarks), ``verdict`` (what 2 and 5 find), ``batch`` (sealing and opening batches), ``sites`` (4 and 5).
"""

from __future__ import annotations

from drsvc.audit.batch import Batch, BatchSealer, open_batch
from drsvc.audit.log import AuditLog, Watermark, audit_dir, open_log
from drsvc.audit.record import (
    ALGORITHMS,
    EXPIRED,
    HEAD,
    KEEP_MIN_S,
    REPLICATED,
    AuditRecord,
    canonical,
    digest,
    log_files,
    parse_record,
    record_intact,
)
from drsvc.audit.sites import Shipment, replicate, verify_with_sites
from drsvc.audit.verdict import AuditFinding, AuditVerdict, Issue

__all__ = [
    "ALGORITHMS",
    "EXPIRED",
    "HEAD",
    "KEEP_MIN_S",
    "REPLICATED",
    "AuditFinding",
    "AuditLog",
    "AuditRecord",
    "AuditVerdict",
    "Batch",
    "BatchSealer",
    "Issue",
    "Shipment",
    "Watermark",
    "audit_dir",
    "canonical",
    "digest",
    "log_files",
    "open_batch",
    "open_log",
    "parse_record",
    "record_intact",
    "replicate",
    "verify_with_sites",
]
