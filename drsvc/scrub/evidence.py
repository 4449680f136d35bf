"""The evidence: audit batches (``drsvc.audit``) and DR drill reports.

1. Each belongs at every site of the tenant (they are written to all of them), and wherever it is.
2. Read like segments: a share chosen by the rotation, plus every copy of one whose copies differ in size or
   that the last run left damaged, and a good copy of one a site lacks. An audit batch verifies when it
   opens as the batch its name says (authenticated, its name the keyed id of its content); a drill report
   when it authenticates as a sealed object of type 9 under its name (``drsvc.check.verify_evidence``).
3. A missing or bad copy is rewritten from a copy that verified; one intact nowhere is unrecoverable.
"""

from __future__ import annotations

import functools

from drsvc.core.layout import Kind
from drsvc.core.repository import gather_limited
from drsvc.scrub.engine import SMALL_AT_ONCE, Scrub, ScrubObject

WHAT = {Kind.AUDIT: "audit batch", Kind.DRILL: "drill report"}


async def read_evidence(s: Scrub) -> None:
    todo = [*s.of_kind(Kind.AUDIT), *s.of_kind(Kind.DRILL)]
    for o in todo:
        s.expect(o, set(s.site_order) | set(o.sizes))
    done = 0

    async def one(o: ScrubObject) -> None:
        nonlocal done
        await _verify(s, o)
        done += 1
        s.tell("evidence", done, len(todo), o.label, o.read)

    await gather_limited(SMALL_AT_ONCE, [functools.partial(one, o) for o in todo])


async def _verify(s: Scrub, o: ScrubObject) -> None:
    every = s.every(o)
    if not (every or o.targets):
        return
    got = await s.read(o, s.verifier(o), every)
    if got is not None:
        await s.repair_copies(o, got[1])
    elif o.sizes:
        s.lost(o, f"no copy of the {WHAT[o.handle.kind]} verifies")
