"""``smoothgrad-audit history OUTPUT``: every completed run of a scheduled audit on one page.

A scheduled audit runs the same model over the same (or nearly the same) data
every night, each run in ``OUTPUT/run_id=<RUN_ID>/``. This page (``index.html``
and PNGs in ``img/``, opened from disk: no network, no JavaScript) reads every
completed run under ``OUTPUT`` (a folder with ``_MANIFEST.json``; a folder
without one is a run still going or one that died, and is left out) and shows:

* a status matrix: each check of ``_FINDINGS.json`` (with its class, when it
  has one) against each run, oldest first by the manifest's ``finished_at``
  (else ``started_at``), each run's overall status in a header row; a run
  without findings is "not audited"; checks that warned or failed in some run
  come first;
* trends over the runs: accuracy, mean reliability, mean border mass, samples
  used and the error rate;
* drift: the measures of the ``drift_*`` checks, one line per class, when the
  runs' findings have any.

It lives in :mod:`pipelines.report`, not :mod:`pipelines.audit`: like
``report`` and ``compare`` it only reads finished runs and draws a page, and
it reuses their pieces (:class:`~pipelines.report.pages.Site`, the Jinja2
templates, :mod:`pipelines.report.figures`, the findings reader of
:mod:`pipelines.report.findings_view`); the audit package makes findings, this
only reads them.

Cost: per run, its manifest (read twice: once to order the runs, once to open
the run), its ``_FINDINGS.json``, and the :data:`COLUMNS` of its corpus
through :func:`~pipelines.report.run_data.open_run` (a few numeric columns,
about 40 bytes a row with the row locations: no key, no hash, no map, no
image, nothing of ``_audit/``). Each run is reduced to a handful of numbers
before the next is read, so memory holds one run's columns at a time, and the
time grows with the rows of all runs read. ``--last N`` opens only the N most
recent runs (every manifest is still read, to order them).
"""

from __future__ import annotations

import dataclasses
import re
import sys

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.audit import findings as findings_file
from pipelines.audit.rules import RULES
from pipelines.report import figures, findings_view, pages
from pipelines.report.run_data import Run, RunError, _read_json, open_run
from transforms.support import storage
from transforms.write.corpus import MANIFEST, now_utc

PROG = "smoothgrad-audit history"
#: The page's folder under OUTPUT when ``--out`` is not given.
DEFAULT_OUT = "_history"
#: The corpus columns the trends read (a column a corpus lacks is left out).
COLUMNS = ("label", "predicted", "target_rank", "reliability", "border_mass", "samples_used")
#: Matrix rows of checks that passed in every run; checks that warned or failed are all shown.
PASSING_ROWS_SHOWN = 200
#: Lines per drift figure: classes flagged in some run first, then the lowest classes.
DRIFT_LINES = 8
#: The drift checks the audit's rules know, in their order; any other ``drift_*`` check found is drawn after them.
DRIFT_CHECKS = tuple(name for name in RULES if name.startswith("drift_"))
#: The trends: (metric, title, what it is).
TRENDS = (
    ("accuracy", "accuracy", "Share of labelled records whose clean top-1 prediction is their label (one row per "
     "record: target_rank 0)."),
    ("reliability", "mean reliability", "Mean split-half reliability of the maps (the reliability column)."),
    ("border_mass", "mean border mass", "Mean share of a map's mass in the outer 10 % frame of the image."),
    ("samples", "samples used", "Mean noisy samples per map (the samples_used column; the config's samples for a "
     "corpus without it)."),
    ("error_rate", "error rate", "Records that ended as error rows, over records read (from the manifest)."),
)
STATUSES = findings_file.STATUSES


@dataclasses.dataclass
class Point:
    """One completed run as the page shows it.

    Attributes:
        run_id: the run id (the manifest's, else the folder's).
        path: the run folder.
        started, finished: the manifest's times (ISO 8601), or None.
        records_read: the manifest's count, or None.
        status: the findings' overall status; None when the run was not audited.
        note: why the run has no findings, or why its corpus could not be read; None when all was read.
        checks: ``{(check, class): entry of _FINDINGS.json}`` (the worst entry when a pair repeats).
        metrics: the trends' values (:func:`measure`); a value the run cannot give is None.
    """

    run_id: str
    path: str
    started: str | None
    finished: str | None
    records_read: int | None
    status: str | None
    note: str | None
    checks: dict
    metrics: dict

    @property
    def when(self) -> str:
        """The run's time as the page shows it: ``YYYY-MM-DD HH:MM`` (UTC), or empty."""
        return (self.finished or self.started or "")[:16].replace("T", " ")


def completed_runs(output: str) -> tuple[list[tuple[dict, str]], list[str]]:
    """The completed runs under ``output``, oldest first, and the folders whose manifest cannot be read.

    Returns:
        ``([(manifest, run folder), ...], ["<folder>: <why>", ...])``.

    Raises:
        RunError: when ``output`` does not exist or holds no completed run.
    """
    output = output.rstrip("/") or "/"
    if not storage.exists(output):
        raise RunError(f"{output} does not exist")
    matched = FileSystems.match([FileSystems.join(output, "run_id=*", MANIFEST)])[0].metadata_list
    runs, skipped = [], []
    for metadata in matched:
        run_dir = FileSystems.split(metadata.path)[0]
        try:
            manifest = _read_json(metadata.path)
        except RunError as error:
            skipped.append(str(error))
            continue
        if not isinstance(manifest, dict):
            skipped.append(f"{metadata.path} is not a run manifest (a JSON object)")
            continue
        runs.append((manifest, run_dir))
    if not runs and FileSystems.exists(FileSystems.join(output, MANIFEST)):
        raise RunError(f"{output} is a run folder; give the folder that holds the runs ("
                       f"{FileSystems.split(output)[0]})")
    if not runs:
        why = f"; {len(skipped)} manifest(s) cannot be read, e.g. {skipped[0]}" if skipped else ""
        raise RunError(f"{output} holds no completed run (no run_id=*/{MANIFEST}){why}")
    runs.sort(key=lambda item: (str(item[0].get("finished_at") or item[0].get("started_at") or ""), item[1]))
    return runs, skipped


def _mean(run: Run, column: str) -> float | None:
    if not run.has(column):
        return None
    values = run.values(column)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def measure(run: Run, checks: list[dict]) -> dict:
    """The trends' values of one run, from its manifest, scalar columns and checks.

    Returns:
        ``{"accuracy", "accuracy_from" ("labels", "checks" or None), "reliability", "border_mass", "samples",
        "error_rate", "rows"}``; a value the run cannot give is None.
    """
    manifest = run.manifest
    accuracy, source = None, None
    if run.has("label") and "predicted" in run.table.column_names:
        first = run.values("target_rank") == 0 if run.has("target_rank") else np.ones(run.num_rows, bool)
        labels, predicted = run.values("label")[first], run.values("predicted")[first]
        labelled = np.isfinite(labels)
        if labelled.any():
            accuracy, source = float(np.mean(predicted[labelled] == labels[labelled])), "labels"
    if accuracy is None:  # a corpus without labels: the audit's per-class accuracies, if it measured any
        per_class = [check["measure"] for check in checks
                     if check["check"] == "class_accuracy" and isinstance(check["measure"], (int, float))]
        if per_class:
            accuracy, source = float(np.mean(per_class)), "checks"
    samples = _mean(run, "samples_used")
    config = manifest.get("config")
    configured = config.get("samples") if isinstance(config, dict) else None
    if samples is None and isinstance(configured, (int, float)) and not isinstance(configured, bool):
        samples = float(configured)  # "auto" in a corpus without the column: unknown
    read, errors = manifest.get("records_read"), manifest.get("errors_total")
    error_rate = errors / read if isinstance(read, (int, float)) and isinstance(errors, (int, float)) and read \
        else None
    return {"accuracy": accuracy, "accuracy_from": source, "reliability": _mean(run, "reliability"),
            "border_mass": _mean(run, "border_mass"), "samples": samples, "error_rate": error_rate,
            "rows": run.num_rows}


def _target(value):
    """A check's class as a key: an integer, None, or (in a file edited by hand) its text."""
    return value if value is None or (isinstance(value, int) and not isinstance(value, bool)) else str(value)


def _text(value) -> str | None:
    return None if value is None else str(value)


def read_point(manifest: dict, run_dir: str) -> Point:
    """One run: its findings (or why there are none) and its trends' values; an unreadable corpus is a note."""
    document, note = findings_view.read_findings(run_dir)
    if note == findings_view.NOT_AUDITED.format(name=findings_file.FINDINGS):
        note = f"No {findings_file.FINDINGS}: the run was made with audit: false, or before the audit existed."
    checks = {}
    for check in (document or {}).get("checks", []):
        key = (str(check["check"]), _target(check["class"]))
        if key not in checks or STATUSES.index(check["status"]) > STATUSES.index(checks[key]["status"]):
            checks[key] = check
    status = None
    if document is not None:
        status = document.get("status") if document.get("status") in STATUSES \
            else findings_file.worst(check["status"] for check in checks.values())
    try:
        metrics = measure(open_run(run_dir, COLUMNS), list(checks.values()))
    except RunError as error:
        metrics, note = {}, (f"{note} " if note else "") + f"The corpus cannot be read: {error}."
    return Point(run_id=str(manifest.get("run_id") or run_dir.rsplit("run_id=", 1)[-1]), path=run_dir,
                 started=_text(manifest.get("started_at")), finished=_text(manifest.get("finished_at")),
                 records_read=manifest.get("records_read"), status=status,
                 note=note, checks=checks, metrics=metrics)


# ------------------------------------------------------------------ the status matrix
def _class_key(target) -> tuple:
    """Sorts the run-wide entry (None) first, then classes by number, then any class given as text."""
    return (0, 0, "") if target is None else (1, target, "") if isinstance(target, int) else (2, 0, target)


def _label(check: str, target) -> str:
    return check if target is None else f"{check} · class {target}"


def status_matrix(points: list[Point]) -> dict:
    """Each check (and class) against each run.

    Returns:
        ``{"rows": [{"check", "class", "label", "worst", "changed", "cells": [{"status", "word", "measure",
        "title"}]}], "flagged", "total", "more"}``: rows flagged in some run first (fail, then warn), then rows
        that passed in every run (at most :data:`PASSING_ROWS_SHOWN`, ``more`` counts the rest). A cell's status
        is ``pass``, ``warn``, ``fail``, ``none`` (the run was not audited) or ``absent`` (not in its findings).
    """
    keys = dict.fromkeys(key for point in points for key in point.checks)
    rows = []
    for check, target in keys:
        cells = []
        for point in points:
            entry = point.checks.get((check, target))
            if point.status is None:
                cells.append({"status": "none", "word": "not audited", "measure": None, "title": point.note or ""})
            elif entry is None:
                cells.append({"status": "absent", "word": "–", "measure": None,
                              "title": "not in this run's findings"})
            else:
                cells.append({"status": entry["status"], "word": entry["status"], "title": entry["summary"],
                              "measure": entry["measure"] if isinstance(entry["measure"], (int, float)) else None})
        seen = [cell["status"] for cell in cells if cell["status"] in STATUSES]
        rows.append({"check": check, "class": target, "label": _label(check, target),
                     "worst": findings_file.worst(seen), "changed": len(set(seen)) > 1, "cells": cells})
    rows.sort(key=lambda row: (-STATUSES.index(row["worst"]), row["check"], _class_key(row["class"])))
    flagged = [row for row in rows if row["worst"] != "pass"]
    passing = [row for row in rows if row["worst"] == "pass"]
    return {"rows": flagged + passing[:PASSING_ROWS_SHOWN], "flagged": len(flagged), "total": len(rows),
            "more": max(0, len(passing) - PASSING_ROWS_SHOWN)}


# ------------------------------------------------------------------ the figures
def trends(points: list[Point], site: pages.Site) -> list[dict]:
    """One figure per trend: ``[{"name", "title", "about", "src" (None without a value), "note"}]``."""
    ids, shown = [point.run_id for point in points], []
    for name, title, about in TRENDS:
        values = [point.metrics.get(name) for point in points]
        entry = {"name": name, "title": title, "about": about, "src": None, "note": None}
        if name == "accuracy" and any(point.metrics.get("accuracy_from") == "checks" for point in points):
            entry["about"] += (" For a run whose corpus has no labels: the mean of its class_accuracy checks' "
                               "measures.")
        if all(value is None for value in values):
            entry["note"] = f"No run has a value of {title}."
        else:
            path, entry["src"] = site.image(f"trend-{name}.png")
            figures.trend(path, ids, {title: values}, f"{title} per run", title)
        shown.append(entry)
    return shown


def drift(points: list[Point], site: pages.Site) -> dict:
    """The drift checks' measures over the runs, one figure per check, one line per class.

    Returns:
        ``{"note": why there is no figure or None, "figures": [{"check", "src", "about", "classes", "more"}]}``.
    """
    def measured(entry) -> bool:  # a "Not measured" entry (no previous run, say) has nothing to draw
        return isinstance(entry.get("measure"), (int, float))

    found = dict.fromkeys(check for point in points for (check, _), entry in point.checks.items()
                          if check.startswith("drift_") and measured(entry))
    names = [name for name in DRIFT_CHECKS if name in found] + [name for name in found if name not in DRIFT_CHECKS]
    if not names:
        return {"note": "No drift checks yet: no run's findings hold a drift_* check (they compare a run with an "
                        "earlier one: the config's compare_with, or its baseline).", "figures": []}
    ids, shown = [point.run_id for point in points], []
    for name in names:
        entries = [(point, target, entry) for point in points for (check, target), entry in point.checks.items()
                   if check == name and measured(entry)]
        classes = sorted({target for _, target, _ in entries}, key=_class_key)
        flagged = {target for _, target, entry in entries if entry["status"] != "pass"}
        chosen = sorted(([target for target in classes if target in flagged]
                         + [target for target in classes if target not in flagged])[:DRIFT_LINES], key=_class_key)
        series, statuses = {}, {}
        for target in chosen:
            label = "run" if target is None else f"class {target}"
            cells = [point.checks.get((name, target)) for point in points]
            series[label] = [cell["measure"] if cell and isinstance(cell["measure"], (int, float)) else None
                             for cell in cells]
            statuses[label] = [cell["status"] if cell else None for cell in cells]
        thresholds = {entry["threshold"] for _, _, entry in entries if isinstance(entry["threshold"], (int, float))}
        path, src = site.image(f"drift-{re.sub(r'[^A-Za-z0-9_-]', '_', name)}.png")
        figures.trend(path, ids, series, name, "measure", thresholds.pop() if len(thresholds) == 1 else None,
                      statuses)
        shown.append({"check": name, "src": src, "about": RULES[name].measure if name in RULES else "",
                      "classes": len(classes), "more": len(classes) - len(chosen)})
    return {"note": None, "figures": shown}


# ------------------------------------------------------------------ the page
def build_history(output: str, out: str | None = None, last: int | None = None) -> str:
    """Writes the history page of the completed runs under ``output``; returns the path of its ``index.html``.

    Args:
        output: the runs' output folder, holding ``run_id=<RUN_ID>/`` folders (local or ``gs://``).
        out: the page's folder; default ``OUTPUT/_history``.
        last: only the ``last`` most recent completed runs; None for every one.

    Raises:
        RunError: when ``output`` is missing or holds no completed run, or for a bad option.
    """
    if last is not None and last < 1:
        raise RunError(f"--last must be at least 1; got {last}")
    output = output.rstrip("/") or "/"
    runs, skipped = completed_runs(output)
    points = [read_point(manifest, run_dir) for manifest, run_dir in (runs[-last:] if last else runs)]
    site = pages.Site(out or FileSystems.join(output, DEFAULT_OUT))
    try:
        counts = {status: sum(point.status == status for point in points) for status in STATUSES}
        context = {
            "title": f"SmoothGrad audit history of {output}", "generated": now_utc(), "output": output,
            "runs": points, "earlier": len(runs) - len(points), "skipped": skipped,
            "counts": {**counts, "not_audited": sum(point.status is None for point in points)},
            "matrix": status_matrix(points), "trends": trends(points, site), "drift": drift(points, site),
        }
        return site.finish("history.html.j2", context)
    finally:
        site.close()


def parser():
    """The command line of ``smoothgrad-audit history``."""
    command = pages.OneLineParser(
        prog=PROG, description="Draws the history of a scheduled audit on one self-contained HTML page (index.html "
        "and PNGs, no network needed): every check against every completed run under OUTPUT, trends of accuracy, "
        "reliability, border mass, samples used and the error rate, and the drift checks per class.")
    command.add_argument("output", metavar="OUTPUT",
                         help="the runs' output folder, holding run_id=<RUN_ID>/ folders (local or gs://)")
    command.add_argument("--out", metavar="DIR", help=f"output folder (default: OUTPUT/{DEFAULT_OUT}); local or gs://")
    command.add_argument("--last", type=int, metavar="N",
                         help="only the N most recent completed runs (default: every one)")
    return command


def main(argv: list[str] | None = None) -> int:
    """``smoothgrad-audit history``: writes the page, prints its path; 2 and one line on a mistake."""
    return pages.run_command(PROG, parser(), lambda args: build_history(args.output, args.out, args.last), argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
