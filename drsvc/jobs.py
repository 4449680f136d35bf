"""Jobs (restores, drills) run by the daemon under a concurrency limit, their state kept in SQLite."""
