"""The audit: checks over a finished run's corpus and its ``_audit/`` aggregates, written as ``_FINDINGS.json``."""
