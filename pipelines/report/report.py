"""``smoothgrad-audit report RUN_DIR``: a self-contained HTML audit of one finished run.

The page (``index.html`` and PNGs in ``img/``, opened from disk, no network)
has six sections: the audit's findings with their evidence
(:mod:`pipelines.report.findings_view`), the run summary from the manifest, a
table and the mean maps per explained class, histograms of the per-map
statistics, galleries of the most telling maps beside their images, and the errors.

Scale: statistics come from the scalar columns only; maps are read only for
the rows shown, from the row groups that hold them (:mod:`pipelines.report.run_data`).

The summary and the per-class table are used by :mod:`pipelines.report.compare`
too; rendering and the output folder are :mod:`pipelines.report.pages`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.report import figures, findings_view
from pipelines.report.pages import OneLineParser, Site, run_command
from pipelines.report.run_data import (
    Run,
    RunError,
    caption,
    input_size,
    load_maps,
    load_pictures,
    open_run,
    read_errors,
)
from transforms.write.corpus import now_utc

PROG = "smoothgrad-audit report"
DEFAULT_TOP = 12
ERRORS_SHOWN = 200
FILES_SHOWN = 100
#: The manifest's counts, shown with a ``data-count`` attribute each.
COUNTS = ("records_read", "records_explained", "rows_written", "errors_total")
#: Counts of a run with a baseline (records reused from it, and how this input differs from it).
BASELINE_COUNTS = ("records_reused", "records_new", "records_changed", "records_retried", "records_removed")
#: Statistics with a histogram when their column exists (over the range of their values).
HISTOGRAMS = ("entropy", "gini", "border_mass", "mass_in_mask", "reliability")
#: Statistics averaged per class when their column exists.
CLASS_MEANS = ("entropy", "border_mass", "reliability", "mass_in_mask")


def method_summary(engine: dict) -> str:
    """What each noisy sample contributed, in words: the method and its settings (a run made before methods
    existed explained the gradient)."""
    method = engine.get("method") or "gradient"
    if method == "integrated_gradients":
        return (f"integrated gradients ({engine.get('ig_steps')} path points per noisy sample, "
                f"{engine.get('ig_baseline')} baseline), smoothed as {engine.get('variant')}")
    if method == "gradcam":
        return f"Grad-CAM on layer {engine.get('gradcam_layer')!r}, smoothed as {engine.get('variant')}"
    return f"input gradient, smoothed as {engine.get('variant', 'smoothgrad')}"


def summary(run: Run, site: Site | None = None) -> dict:
    """The run summary from the manifest (with the sanity cascade figure when ``site`` is given)."""
    manifest = run.manifest
    model = manifest.get("model") or {}
    errors = manifest.get("errors") or {}
    counts = [(name, manifest.get(name)) for name in COUNTS]
    if manifest.get("baseline"):  # a scheduled audit: what the baseline run gave
        counts[2:2] = [(name, manifest.get(name)) for name in BASELINE_COUNTS]
    counts += [(f"errors.{stage}", count) for stage, count in errors.items()]
    sanity = manifest.get("sanity") or None
    cascade_src = None
    if site is not None and sanity and (sanity.get("randomisation") or {}).get("cascade"):
        path, cascade_src = site.image("sanity-cascade.png")
        figures.cascade(path, sanity["randomisation"]["cascade"],
                        (sanity.get("convergence") or {}).get("split_half_rank_correlation"))
    files = list((manifest.get("files") or {}).items())
    facts = [("run id", run.run_id), ("folder", run.path), ("started", manifest.get("started_at")),
             ("finished", manifest.get("finished_at"))]
    engine = manifest.get("smoothgrad") or {}
    facts.append(("method", method_summary(engine)))
    used = manifest.get("samples_used") or {}
    if used.get("reached_target_before_max") is not None:  # samples: auto
        facts.append(("samples: auto", f"{used['mean']:.1f} samples per map on average; "
                      f"{100 * used['reached_target_before_max']:.1f} % of maps reached the target (estimated: "
                      "their estimate passed the stopping threshold before max_samples)"))
    return {
        "run": facts,
        "model": [("source", model.get("source")), ("weights", model.get("weights")),
                  ("input shape", model.get("input_shape")), ("classes", model.get("classes")),
                  ("scores from", model.get("scores_from"))],
        "sha256": model.get("sha256") or "",
        "parameters": list((manifest.get("smoothgrad") or {}).items()),
        "target": str((manifest.get("smoothgrad") or {}).get("target", "")),
        "input": list(manifest.get("input") or []),
        "counts": counts,
        "invariant_holds": manifest.get("invariant_holds"),
        "quality": list((manifest.get("quality") or {}).items()),
        "sanity": sanity,
        "cascade_src": cascade_src,
        "files": files[:FILES_SHOWN],
        "files_more": max(0, len(files) - FILES_SHOWN),
    }


def class_table(run: Run) -> dict:
    """Per explained class (the ``target`` column): maps, accuracy when labels exist, means of statistics.

    Returns:
        ``{"columns": [...], "rows": [[class, maps, ...], ...], "total": [...]}``.
    """
    means = [name for name in CLASS_MEANS if run.has(name)]
    labelled = run.has("label")
    columns = ["class", "maps"] + (["accuracy"] if labelled else []) + [f"mean {name}" for name in means]
    if not run.num_rows:
        return {"columns": columns, "rows": [], "total": []}
    classes, index = np.unique(run.values("target").astype(np.int64), return_inverse=True)
    everyone = np.zeros(len(index), np.int64)
    figures_by = []
    for group, size in ((index, len(classes)), (everyone, 1)):
        cells = [np.bincount(group, minlength=size)]
        if labelled:
            label, predicted = run.values("label"), run.values("predicted")
            cells.append(_group_mean(group, size, np.where(np.isfinite(label), predicted == label, np.nan)))
        cells += [_group_mean(group, size, run.values(name)) for name in means]
        figures_by.append(cells)
    rows = [[int(cls)] + [int(figures_by[0][0][i])] + [cell[i] for cell in figures_by[0][1:]]
            for i, cls in enumerate(classes)]
    total = ["all", int(figures_by[1][0][0])] + [cell[0] for cell in figures_by[1][1:]]
    return {"columns": columns, "rows": rows, "total": total}


def _group_mean(group: np.ndarray, size: int, values: np.ndarray) -> list:
    finite = np.isfinite(values)
    sums = np.bincount(group, weights=np.where(finite, values, 0.0), minlength=size)
    counts = np.bincount(group, weights=finite.astype(np.float64), minlength=size)
    return [float(total / count) if count else None for total, count in zip(sums, counts)]


# ------------------------------------------------------------------ the report
@dataclasses.dataclass
class Gallery:
    """One gallery: the rows chosen by one criterion, best first.

    Attributes:
        id: the HTML id suffix (``gallery-<id>``).
        title: the heading.
        about: one sentence on how the rows were chosen.
        statistic: the column shown under each tile, or None.
        rows: row indices into the run's table.
        note: why the gallery is empty, if it is.
    """

    id: str
    title: str
    about: str
    statistic: str | None
    rows: list
    note: str | None = None


def _extreme(values: np.ndarray, top: int, largest: bool) -> list[int]:
    finite = np.flatnonzero(np.isfinite(values))
    order = np.argsort(-values[finite] if largest else values[finite], kind="stable")
    return [int(row) for row in finite[order][:top]]


def choose_galleries(run: Run, top: int, seed: int) -> list[Gallery]:
    """The report's galleries; a gallery of a column the run lacks is left out."""
    columns = run.table.column_names
    galleries = [Gallery("border", "Highest border mass", "Maps with the largest share of their mass in the "
                         "outer 10 % frame of the image.", "border_mass",
                         _extreme(run.values("border_mass"), top, True) if run.has("border_mass") else [])]
    if "mass_in_mask" in columns:
        galleries.append(Gallery("mask", "Lowest mass in mask", "Maps with the smallest share of their mass on "
                                 "the object mask.", "mass_in_mask",
                                 _extreme(run.values("mass_in_mask"), top, False) if run.has("mass_in_mask") else [],
                                 None if run.has("mass_in_mask") else "No record of this run has a mask."))
    if "reliability" in columns:
        galleries.append(Gallery("reliability", "Lowest reliability", "Maps whose even and odd noise samples "
                                 "agree least (split-half Spearman correlation).", "reliability",
                                 _extreme(run.values("reliability"), top, False) if run.has("reliability") else [],
                                 None if run.has("reliability") else "Reliability needs samples >= 2."))
    mistakes = Gallery("mistakes", "Confident mistakes", "Records whose clean prediction differs from their "
                       "label, by the score of the explained class, highest first.", "score", [])
    if run.has("label"):
        label, predicted = run.values("label"), run.values("predicted")
        wrong = np.isfinite(label) & (predicted != label)
        if int(run.manifest.get("maps_per_record") or 1) > 1:
            wrong &= run.values("target_rank") == 0  # one tile per record: its top-1 map
        mistakes.rows = _extreme(np.where(wrong, run.values("score"), np.nan), top, True)
        mistakes.note = None if mistakes.rows else "No labelled record is mispredicted."
    else:
        mistakes.note = "This run has no labels."
    galleries.append(mistakes)
    order = np.lexsort((run.values("target"), run.values("key").astype(str))) if run.num_rows else np.zeros(0, int)
    picked = np.random.default_rng(seed).choice(run.num_rows, size=min(top, run.num_rows), replace=False)
    galleries.append(Gallery("random", "Random sample", f"A random sample of the maps (seed {seed}; the same "
                             "seed gives the same sample).", None, [int(order[i]) for i in picked]))
    for gallery in galleries:
        if not gallery.rows and gallery.note is None:
            gallery.note = "No map has a value for this statistic." if gallery.statistic else "The corpus is empty."
    return galleries


def _tiles(run: Run, site: Site, galleries: list[Gallery]) -> list[dict]:
    """Draws one PNG per shown row; returns each gallery with its tiles."""
    rows = sorted({row for gallery in galleries for row in gallery.rows})
    maps, pictures = load_maps(run, rows), load_pictures(run, rows)
    values = dict(zip(rows, run.rows(rows)))
    size, sources = input_size(run), {}
    for row in rows:
        path, sources[row] = site.image(f"tile-{row}.png")
        figures.tile(path, pictures[row], maps[row], size)
    return [{"id": gallery.id, "title": gallery.title, "about": gallery.about, "note": gallery.note,
             "statistic": gallery.statistic,
             "tiles": [{"src": sources[row], "note": pictures[row].note, **caption(values[row]),
                        "value": values[row].get(gallery.statistic) if gallery.statistic else None}
                       for row in gallery.rows]}
            for gallery in galleries]


def _histograms(run: Run, site: Site) -> list[dict]:
    shown = []
    varying = ("samples_used",) if "samples_used" in run.table.column_names \
        and len(set(run.values("samples_used").tolist())) > 1 else ()  # samples: auto
    for name in HISTOGRAMS + varying:
        if name not in run.table.column_names:
            continue
        values = run.values(name)
        if not np.isfinite(values).any():
            shown.append({"title": name, "src": None, "note": f"No map has a value of {name}."})
            continue
        path, src = site.image(f"hist-{name}.png")
        figures.histogram(path, values, name, marks={"mean": float(np.nanmean(values)),
                                                           "median": float(np.nanmedian(values))})
        shown.append({"title": name, "src": src, "note": None})
    for kind, title in (("com", "centre of mass"), ("peak", "peak")):
        if run.has(f"{kind}_x") and run.has(f"{kind}_y"):
            path, src = site.image(f"density-{kind}.png")
            figures.density(path, run.values(f"{kind}_x"), run.values(f"{kind}_y"), title)
            shown.append({"title": title, "src": src, "note": None})
    return shown


def build_report(run_dir: str, out: str | None = None, top: int = DEFAULT_TOP, seed: int = 0) -> str:
    """Writes the report of a finished run; returns the path of its ``index.html``.

    Args:
        run_dir: the run folder (local or ``gs://``).
        out: the output folder; default ``RUN_DIR/report``.
        top: tiles per gallery (and per flagged finding).
        seed: the seed of the random gallery.

    Raises:
        RunError: for an incomplete or unreadable run, or a bad option.
    """
    if top < 1:
        raise RunError(f"--top must be at least 1; got {top}")
    run = open_run(run_dir)
    site = Site(out or FileSystems.join(run.path, "report"))
    try:
        errors, errors_total = read_errors(run, ERRORS_SHOWN)
        context = {
            "title": f"SmoothGrad audit of run {run.run_id}", "generated": now_utc(), "top": top,
            "summary": summary(run, site), "classes": class_table(run), "histograms": _histograms(run, site),
            "galleries": _tiles(run, site, choose_galleries(run, top, seed)),
            "errors": errors, "errors_total": errors_total, "errors_more": max(0, errors_total - len(errors)),
            **findings_view.audit_views(run, site, top),
        }
        return site.finish("report.html.j2", context)
    finally:
        site.close()


def parser() -> argparse.ArgumentParser:
    """The command line of ``smoothgrad-audit report``."""
    command = OneLineParser(prog=PROG, description="Writes a self-contained HTML audit (index.html and PNGs, "
                            "no network needed) of a finished run: the audit's findings with their evidence, "
                            "summary, per-class table and mean maps, histograms of the map statistics, "
                            "galleries of maps beside their images, errors.")
    command.add_argument("run_dir", metavar="RUN_DIR", help="the run folder, OUTPUT/run_id=<RUN_ID> (local or gs://)")
    command.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/report); local or gs://")
    command.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="K",
                         help=f"tiles per gallery and per flagged finding (default {DEFAULT_TOP})")
    command.add_argument("--seed", type=int, default=0, metavar="S",
                         help="seed of the random gallery (default 0); the same seed shows the same maps")
    return command


def main(argv: list[str] | None = None) -> int:
    """``smoothgrad-audit report``: writes the report, prints the page's path; 2 and one line on a mistake."""
    return run_command(PROG, parser(), lambda args: build_report(args.run_dir, args.out, args.top, args.seed),
                       argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
