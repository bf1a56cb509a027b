"""The report's audit views: the findings that open the page, and every class's mean map.

The audit of a run (:mod:`pipelines.audit.audit`) leaves ``_FINDINGS.json``
(the verdict: one entry per check, passing or not) and, when the pipeline
kept audit data, ``_audit/evidence.json`` and ``_audit/evidence.npz`` (class
and strategy-cluster mean maps at the audit grid, candidate regions, the
counterfactual figures). This module turns them into the page's context:

* :func:`findings_section`: the overall status, the failing and warning checks
  with their evidence (figures and tiles of the affected keys), then a compact
  table of the passing ones, so that "checked and fine" shows as well as
  "flagged". A run without ``_FINDINGS.json`` is said to be not audited.
* :func:`class_maps`: one thumbnail figure per class, its mean map beside the
  means of its correct and wrong maps when the run has labels;
* the drift since a previous run, when the audit measured it
  (:mod:`pipelines.report.drift_view`).

The page stays bounded: at most :data:`DETAILED` flagged checks get figures,
each with at most ``top`` tiles, and at most :data:`CLASS_MAPS_SHOWN` classes
get a mean-map figure.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.audit import findings as findings_file
from pipelines.audit.audit import EVIDENCE_ARRAYS, EVIDENCE_JSON
from pipelines.report import figures
from pipelines.report.drift_view import drift_section
from pipelines.report.run_data import Run, caption, input_size, load_maps, load_pictures
from transforms.audit.pooling import AUDIT_DIR
from transforms.support.errors import one_line

#: Flagged checks drawn with their evidence; more are listed in a table without figures.
DETAILED = 12
#: Passing checks listed by name, class and measure; the page counts the rest.
PASSING_SHOWN = 200
#: Classes with a mean-map figure (the most frequent first).
CLASS_MAPS_SHOWN = 48
#: Strategy-cluster means drawn beside a class's mean.
CLUSTERS_SHOWN = 6
#: Every field of a check the page reads: an entry edited by hand may lack some (the audit writes them all).
CHECK_DEFAULTS = {"check": "?", "class": None, "region": None, "measure": None, "threshold": None,
                  "confirmed": None, "keys": [], "keys_total": 0, "summary": ""}
#: The Findings section of a run without ``_FINDINGS.json``.
NOT_AUDITED = ("This run was not audited: it has no {name} (made before the audit existed, or with audit: false). "
               "Nothing below was checked for shortcuts, strategies or label errors.")


@dataclasses.dataclass
class Evidence:
    """The audit's evidence of a run, or why there is none.

    Attributes:
        document: the parsed ``_audit/evidence.json``, or None.
        arrays: the maps of ``_audit/evidence.npz`` by name (empty without it).
        note: why the evidence is missing or incomplete, one line; None when both files were read.
    """

    document: dict | None
    arrays: dict
    note: str | None = None

    def grid(self, run: Run) -> tuple[int, tuple[int, int]]:
        """Where the audit maps lie in the input.

        Args:
            run: the run, whose input size serves when the evidence has no grid.

        Returns:
            (input pixels per cell side, input (H, W)).
        """
        grid = (self.document or {}).get("grid") or {}
        size = tuple(grid.get("input_shape") or input_size(run))[:2]
        cells = grid.get("cells")
        cell = grid.get("cell") or (-(-size[0] // cells[0]) if cells else 1)  # ceil: the last cells may be cut
        return int(cell), (int(size[0]), int(size[1]))

    def classes(self) -> dict:
        """``{class: its evidence}`` with integer classes."""
        return {int(name): entry for name, entry in ((self.document or {}).get("classes") or {}).items()}

    def mean(self, target: int, group: str | None = None) -> np.ndarray | None:
        """The class's mean map (``group``: ``correct``, ``wrong``, or ``cluster_<i>``), or None."""
        return self.arrays.get(f"class_{target}_{group}_mean" if group else f"class_{target}_mean")


def _read_bytes(path: str) -> bytes:
    with FileSystems.open(path) as handle:
        return handle.read()


def read_evidence(run_dir: str) -> Evidence:
    """The evidence files of a run; a missing or unreadable file becomes the note, never an error."""
    folder = FileSystems.join(run_dir, AUDIT_DIR)
    paths = [FileSystems.join(folder, name) for name in (EVIDENCE_JSON, EVIDENCE_ARRAYS)]
    missing = [f"{AUDIT_DIR}/{name}" for name, path in zip((EVIDENCE_JSON, EVIDENCE_ARRAYS), paths)
               if not FileSystems.exists(path)]
    if missing:
        return Evidence(None, {}, f"The run has no audit evidence ({' and '.join(missing)} missing): the pipeline "
                                  "kept no audit data, or the run was not audited.")
    try:
        document = json.loads(_read_bytes(paths[0]).decode("utf-8"))
        with np.load(io.BytesIO(_read_bytes(paths[1])), allow_pickle=False) as stored:
            arrays = {name: np.asarray(stored[name], np.float64) for name in stored.files}
    except (OSError, ValueError) as error:
        return Evidence(None, {}, f"The audit evidence cannot be read: {one_line(error)}")
    return Evidence(document if isinstance(document, dict) else None, arrays)


def read_findings(run_dir: str) -> tuple[dict | None, str | None]:
    """(the ``_FINDINGS.json`` document, None) or (None, why there is none)."""
    try:
        document = findings_file.read(run_dir)
    except (OSError, ValueError) as error:
        return None, f"{findings_file.FINDINGS} cannot be read: {one_line(error)}"
    if document is None:
        return None, NOT_AUDITED.format(name=findings_file.FINDINGS)
    if not isinstance(document, dict) or not isinstance(document.get("checks"), list) \
            or not all(isinstance(check, dict) and check.get("status") in findings_file.STATUSES
                       for check in document["checks"]):
        return None, (f"{findings_file.FINDINGS} is not a findings document (an object with checks, each with a "
                      "status); the audit writes it again.")
    document["checks"] = [{**CHECK_DEFAULTS, **check} for check in document["checks"]]
    return document, None


# ------------------------------------------------------------------ keys → rows, tiles
def _row_index(run: Run) -> dict:
    """``{key: [rows]}`` of the corpus."""
    index = {}
    for row, key in enumerate(run.values("key").tolist() if run.num_rows else []):
        index.setdefault(key, []).append(row)
    return index


def _row_of(rows: list, targets: np.ndarray, ranks: np.ndarray | None, target: int | None) -> int:
    """The map that shows a key for a check: of the check's class if any, else the record's first map."""
    if target is not None:
        for row in rows:
            if targets[row] == target:
                return row
    if ranks is not None:
        for row in rows:
            if ranks[row] == 0:
                return row
    return rows[0]


def _draw_tiles(run: Run, site, wanted: list[tuple[str, int, list | None]]) -> dict:
    """Draws the tiles ``[(name, row, box)]``, reading each row's map and image once; returns ``{name: tile}``."""
    rows = sorted({row for _, row, _ in wanted})
    maps, pictures = load_maps(run, rows), load_pictures(run, rows)
    values = dict(zip(rows, run.rows(rows)))
    size, tiles = input_size(run), {}
    for name, row, box in wanted:
        path, src = site.image(name)
        figures.tile(path, pictures[row], maps[row], size, box)
        tiles[name] = {"src": src, "note": pictures[row].note, "value": None, **caption(values[row])}
    return tiles


# ------------------------------------------------------------------ the findings section
def _shortcut_evidence(check: dict, index: int, evidence: Evidence, run: Run, site) -> dict:
    """The figures of a ``shortcut_region`` check: class and cluster means with the region, counterfactuals."""
    target, shown = check["class"], {"maps_src": None, "counterfactual_src": None, "clusters": [], "region": None,
                                     "counterfactual": None, "note": None}
    entry = evidence.classes().get(target) if target is not None else None
    if entry is None or evidence.mean(target) is None:
        shown["note"] = evidence.note or f"The audit evidence holds nothing on class {target}."
        return shown
    region = check.get("region") or (entry.get("region") or {}).get("region")
    clusters = entry.get("clusters") or []
    panels = [(f"class {target} mean", evidence.mean(target))]
    if len(clusters) > 1:  # one cluster's mean is the class's mean again
        for number, cluster in enumerate(clusters[:CLUSTERS_SHOWN]):
            panels.append((f"cluster {number} · {cluster.get('share', 0):.0%}",
                           evidence.mean(target, f"cluster_{number}")))
    cell, size = evidence.grid(run)
    path, shown["maps_src"] = site.image(f"finding-{index}-maps.png")
    figures.audit_maps(path, panels, cell, size, region, width=1.6)
    shown["clusters"] = [{"number": number, "size": cluster.get("size"), "share": cluster.get("share")}
                         for number, cluster in enumerate(clusters)]
    shown["region"] = entry.get("region")
    outcome = (entry.get("region") or {}).get("counterfactual")
    if outcome:
        path, shown["counterfactual_src"] = site.image(f"finding-{index}-counterfactual.png")
        figures.counterfactual(path, outcome)
        shown["counterfactual"] = outcome
    return shown


def findings_section(run: Run, site, top: int, evidence: Evidence) -> dict:
    """The context of the Findings section.

    Args:
        run: the run (its scalar columns find the rows of the affected keys).
        site: the page's output folder (:class:`pipelines.report.pages.Site`).
        top: tiles per flagged check.
        evidence: the run's :class:`Evidence`.

    Returns:
        ``{"audited": False, "note"}`` without findings; else ``{"audited": True, "status", "tally":
        [(check, fail, warn, pass)], "flagged": [check views, worst first], "listed": [flagged checks beyond
        DETAILED], "passing": [...], "passing_more": int}``, each check view with its figures and ``tiles``.
    """
    document, note = read_findings(run.path)
    if document is None:
        return {"audited": False, "note": note}
    checks = findings_file.rank(document["checks"])
    flagged = [check for check in checks if check["status"] != "pass"]
    passing = [check for check in checks if check["status"] == "pass"]
    tally = {}
    for check in checks:
        tally.setdefault(check["check"], {status: 0 for status in findings_file.STATUSES})[check["status"]] += 1
    index, views, wanted = _row_index(run), [], []
    targets = run.values("target") if run.num_rows else np.zeros(0)
    ranks = run.values("target_rank") if run.has("target_rank") else None
    for number, check in enumerate(flagged[:DETAILED]):
        view = {**check, "id": f"finding-{number}", "tile_names": [], "absent": [], "shortcut": None}
        box = check.get("region") if check["check"] == "shortcut_region" else None
        for key in check.get("keys") or []:
            if len(view["tile_names"]) >= top:
                break
            if key in index:
                name = f"finding-{number}-{len(view['tile_names'])}.png"
                wanted.append((name, _row_of(index[key], targets, ranks, check.get("class")), box))
                view["tile_names"].append(name)
            elif len(view["absent"]) < top:  # e.g. an error row's key: no map
                view["absent"].append(key)
        if check["check"] == "shortcut_region":
            view["shortcut"] = _shortcut_evidence(check, number, evidence, run, site)
        views.append(view)
    tiles = _draw_tiles(run, site, wanted) if wanted else {}
    for view in views:
        view["tiles"] = [tiles[name] for name in view.pop("tile_names")]
    counts = {status: sum(check["status"] == status for check in checks) for status in findings_file.STATUSES}
    status = document.get("status") or findings_file.worst(status for status, count in counts.items() if count)
    return {"audited": True, "status": status, "counts": {"total": len(checks), **counts},
            "tally": [(name, per["fail"], per["warn"], per["pass"]) for name, per in tally.items()],
            "flagged": views, "listed": flagged[DETAILED:], "passing": passing[:PASSING_SHOWN],
            "passing_more": max(0, len(passing) - PASSING_SHOWN), "evidence_note": evidence.note}


# ------------------------------------------------------------------ every class's mean map
def class_maps(run: Run, site, evidence: Evidence, flagged_regions: dict | None = None) -> dict:
    """The context of the per-class mean maps: one thumbnail figure per class.

    Args:
        run: the run (whether it has labels).
        site: the page's output folder.
        evidence: the run's :class:`Evidence`.
        flagged_regions: ``{class: region}`` of flagged shortcut checks, outlined on the class's maps.

    Returns:
        ``{"note", "labelled", "maps": [{"class", "count", "src"}], "shown", "total", "more"}``.
    """
    classes = evidence.classes()
    if not classes:
        return {"note": evidence.note or "The audit evidence holds no class.", "labelled": False, "maps": [],
                "shown": 0, "total": 0, "more": 0}
    labelled = run.has("label") or any(name.endswith(("_correct_mean", "_wrong_mean")) for name in evidence.arrays)
    by_count = sorted(classes, key=lambda target: (-int(classes[target].get("count") or 0), target))
    chosen = sorted(by_count[:CLASS_MAPS_SHOWN])
    cell, size = evidence.grid(run)
    maps = []
    for target in chosen:
        count = classes[target].get("count")
        panels = [(f"all ({count})" if count is not None else "all", evidence.mean(target))]
        if labelled:
            panels += [(group if evidence.mean(target, group) is not None else f"{group}: none",
                        evidence.mean(target, group)) for group in ("correct", "wrong")]
        path, src = site.image(f"class-{target}-maps.png")
        figures.audit_maps(path, panels, cell, size, (flagged_regions or {}).get(target))
        maps.append({"class": target, "count": count, "src": src})
    return {"note": evidence.note, "labelled": labelled, "maps": maps, "shown": len(maps), "total": len(classes),
            "more": max(0, len(classes) - len(maps))}


def audit_views(run: Run, site, top: int) -> dict:
    """Both views' context (see :func:`findings_section` and :func:`class_maps`).

    Args:
        run: the run.
        site: the page's output folder.
        top: tiles per flagged check.

    Returns:
        ``{"findings": ..., "class_maps": ..., "drift": ...}`` (drift: :func:`pipelines.report.drift_view.drift_section`).
    """
    evidence = read_evidence(run.path)
    section = findings_section(run, site, top, evidence)
    regions = {check["class"]: check["region"] for check in section.get("flagged", []) + section.get("listed", [])
               if check["check"] == "shortcut_region" and check.get("region") and check.get("class") is not None}
    document, _ = read_findings(run.path)
    return {"findings": section, "class_maps": class_maps(run, site, evidence, regions),
            "drift": drift_section(run, site, evidence, (document or {}).get("checks") or [])}
