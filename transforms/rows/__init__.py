"""Rows: maps to stored rows with their per-map figures (``ToRows``)."""
