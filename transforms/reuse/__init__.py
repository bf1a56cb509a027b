"""Reuse: the rows of unchanged records carried over from a baseline run (``Baseline``)."""
