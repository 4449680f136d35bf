"""The HTTP API under /v1 (issue 4): sources, sites, restores, drills; bearer-token auth; audit."""
