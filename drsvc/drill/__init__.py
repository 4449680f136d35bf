"""DR drills (issue 4): scripted restores from each site alone, verified, with RPO/RTO verdicts.

1. ``plan``: read and check a drill plan (sources, sites, points, targets, probes, scratch directory).
2. ``runner``: per source, the requested points; per source x site x point a scenario: restore from the
   site alone (with the others as fallback when it cannot), verify against the repository and against the
   live source (``compare``) or, for postgres, start the restored server and run the probes (``pgprobe``),
   judge RPO and RTO against the targets.
3. ``levels``: the GB/T 20988-2007 level the measured RTO and RPO are consistent with.
4. ``report``: the JSON and HTML report and ``last.json``, which the daemon's /metrics reads.
5. ``evidence``: the report sealed and stored at the sites.
"""

from drsvc.drill.plan import Plan, load_plan, parse_plan
from drsvc.drill.runner import DrillOutcome, run_drill

__all__ = ["DrillOutcome", "Plan", "load_plan", "parse_plan", "run_drill"]
