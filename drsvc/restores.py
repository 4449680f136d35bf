"""Restore requests: validation, dry-run plans, and the restore job with its RPO/RTO verdict."""
