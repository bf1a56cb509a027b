"""Finished runs read back: the audit report and the comparison of two runs (Jinja2 pages, matplotlib figures)."""
