"""DR drills (issue 4): scripted restores from each site alone, verified, with RPO/RTO verdicts."""
