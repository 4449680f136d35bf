"""The audit log of mutating API requests: append-only, hash-chained, kept, replicated sealed."""
