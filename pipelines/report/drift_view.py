"""The report's "Drift since <run>" section: how this run's maps moved since the previous run.

The audit's drift checks (:mod:`pipelines.audit.drift`) leave their figures in
the evidence (``drift`` in ``_audit/evidence.json``; the previous run's class
means, the differences and the per-key agreements in ``_audit/evidence.npz``)
and their verdicts in ``_FINDINGS.json``. The section shows the verdicts, the
histogram of the per-key agreements, the changed predictions, and per class
the two mean maps on one scale beside their difference, the classes that
moved most first; at most :data:`DRIFT_CLASSES_SHOWN` are drawn.
"""

from __future__ import annotations

import numpy as np

from pipelines.report import figures

#: Classes whose mean maps are drawn (the most moved first).
DRIFT_CLASSES_SHOWN = 12
SEVERITY = {"fail": 0, "warn": 1, "pass": 2}


def _largest_shift(shifts: list, p_value: float | None) -> dict | None:
    """The statistic shifted most among the significant ones (else the largest shift), or None."""
    significant = [shift for shift in shifts if p_value is None or shift["p_value"] < p_value]
    return max(significant or shifts, key=lambda shift: abs(shift["delta"]), default=None)


def drift_section(run, site, evidence, checks: list) -> dict | None:
    """The context of the Drift section, or None when the audit measured no drift.

    Args:
        run: the run.
        site: the page's output folder (:class:`pipelines.report.pages.Site`).
        evidence: the run's :class:`pipelines.report.findings_view.Evidence`.
        checks: the entries of its ``_FINDINGS.json``.

    Returns:
        ``{"previous": {"run_id", "path"}, "checks": [drift entries, worst first], "agreement": {...},
        "agreement_src", "flips": {...}, "classes": [{"class", "src", "correlation", "status", "shift"}],
        "shown", "total", "more"}``.
    """
    drift = (evidence.document or {}).get("drift")
    if not isinstance(drift, dict) or not drift.get("previous"):
        return None
    entries = sorted((check for check in checks if str(check.get("check", "")).startswith("drift_")),
                     key=lambda check: (SEVERITY.get(check["status"], 2), check["check"],
                                        -1 if check["class"] is None else check["class"]))
    verdicts = {check["class"]: check["status"] for check in entries if check["check"] == "drift_class_mean"}
    rules = (evidence.document or {}).get("rules") or {}
    p_value = (rules.get("drift_statistics") or {}).get("p_value")
    shifts = drift.get("statistics") or {}
    measured = {int(name): entry for name, entry in (drift.get("classes") or {}).items()
                if evidence.arrays.get(f"drift_class_{name}_difference") is not None}
    order = sorted(measured, key=lambda target: (SEVERITY.get(verdicts.get(target), 2),
                                                 measured[target].get("rank_correlation") or 0.0, target))
    cell, size = evidence.grid(run)
    previous_id = drift["previous"].get("run_id")
    classes = []
    for target in order[:DRIFT_CLASSES_SHOWN]:
        before = evidence.arrays[f"drift_class_{target}_previous"]
        difference = evidence.arrays[f"drift_class_{target}_difference"]
        current = evidence.mean(target)
        current = before + difference if current is None or current.shape != before.shape else current
        path, src = site.image(f"drift-class-{target}.png")
        figures.drift_maps(path, before, current, cell, size, (f"run {previous_id}", "this run", "difference"))
        entry = measured[target]
        classes.append({"class": target, "src": src, "correlation": entry.get("rank_correlation"),
                        "moved": entry.get("moved"), "count": entry.get("count"),
                        "previous_count": entry.get("previous_count"), "status": verdicts.get(target),
                        "shift": _largest_shift(shifts.get(str(target)) or [], p_value)})
    agreement, agreement_src = drift.get("agreement") or {}, None
    values = evidence.arrays.get("drift_agreement")
    if values is not None and np.isfinite(values).any():
        path, agreement_src = site.image("drift-agreement.png")
        figures.histogram(path, values, "agreement with the previous run",
                          (min(0.0, float(np.nanmin(values))), 1.0),
                          marks={"median": agreement.get("median"), "agreement": agreement.get("agreement")})
    return {"previous": drift["previous"], "checks": entries, "agreement": agreement, "agreement_src": agreement_src,
            "flips": drift.get("flips") or {}, "classes": classes, "shown": len(classes), "total": len(measured),
            "more": max(0, len(measured) - len(classes)), "p_value": p_value}
