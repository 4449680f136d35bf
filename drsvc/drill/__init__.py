"""DR drills (issue 4): scripted restores from each site alone, verified, with RPO/RTO verdicts."""

from drsvc.drill.plan import Plan, load_plan, parse_plan
from drsvc.drill.runner import DrillOutcome, run_drill

__all__ = ["DrillOutcome", "Plan", "load_plan", "parse_plan", "run_drill"]
