"""``smoothgrad-audit compare RUN_A RUN_B``: how the maps of two runs over the same records differ.

Rows are paired on ``(key, target)``: the same record explained for the same
class. With ``topk`` each record has K rows, one per class; a record whose
explained classes differ between the runs (e.g. ``top1`` under two models that
predict differently) has no pair, and is counted as such.

For each pair the Spearman rank correlation of the two stored maps (average
ranks for ties) says how much the explanation changed. Maps are never all in
memory: pairs are taken in the order of B's row groups, in chunks of at most
:data:`MAP_BUDGET_BYTES` of maps per run, and each chunk reads only the row
groups of A and B that hold its maps. Maps of different stored sizes cannot be
correlated; the page says so and skips that part.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.report import figures, pages, report
from pipelines.report.run_data import (
    LOCATION,
    Run,
    RunError,
    input_size,
    load_maps,
    load_pictures,
    open_run,
)
from transforms.write.corpus import now_utc
from transforms.engine.statistics import rank_correlation

PROG = "smoothgrad-audit compare"
#: Bytes of maps (float32) per run held at once while correlating.
MAP_BUDGET_BYTES = 256 << 20
KEYS_LISTED = 20
CHANGED_SHOWN = 50
#: Config keys that name a run rather than describe it: not compared.
NOT_COMPARED = ("run_id", "output", "overwrite")


@dataclasses.dataclass
class Matching:
    """How the rows of two runs pair up.

    Attributes:
        a_rows, b_rows: paired row indices (same length), one pair per ``(key, target)`` in both runs.
        only_a, only_b: keys in one run only, sorted.
        unpaired: keys in both runs with no explained class in common, sorted.
        changed: records whose clean prediction differs: ``{"key", "label", "a", "b"}``, sorted by key.
    """

    a_rows: np.ndarray
    b_rows: np.ndarray
    only_a: list
    only_b: list
    unpaired: list
    changed: list


def _first_by_key(run: Run, name: str) -> dict:
    values = {}
    for key, value in zip(run.values("key"), run.values(name)):
        values.setdefault(key, value)
    return values


def match(a: Run, b: Run) -> Matching:
    """Pairs the rows of ``a`` and ``b`` on ``(key, target)``; counts the keys of one run only."""
    index_a = {(key, int(target)): row for row, (key, target) in enumerate(zip(a.values("key"), a.values("target")))}
    a_rows, b_rows, paired = [], [], set()
    for row, (key, target) in enumerate(zip(b.values("key"), b.values("target"))):
        found = index_a.get((key, int(target)))
        if found is not None:
            a_rows.append(found)
            b_rows.append(row)
            paired.add(key)
    predicted_a, predicted_b = _first_by_key(a, "predicted"), _first_by_key(b, "predicted")
    labels = _first_by_key(a, "label")
    both = predicted_a.keys() & predicted_b.keys()
    changed = [{"key": key, "label": None if np.isnan(labels[key]) else int(labels[key]),
                "a": int(predicted_a[key]), "b": int(predicted_b[key])}
               for key in sorted(both) if predicted_a[key] != predicted_b[key]]
    return Matching(a_rows=np.asarray(a_rows, np.int64), b_rows=np.asarray(b_rows, np.int64),
                    only_a=sorted(predicted_a.keys() - both), only_b=sorted(predicted_b.keys() - both),
                    unpaired=sorted(both - paired), changed=changed)


def correlations(a: Run, b: Run, a_rows: np.ndarray, b_rows: np.ndarray,
                 budget: int = MAP_BUDGET_BYTES) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (NaN when a map is constant), chunk by chunk.

    Args:
        a, b: the runs (maps of the same stored shape).
        a_rows, b_rows: the paired rows.
        budget: bytes of maps per run held at once.

    Returns:
        float64 ``[pairs]``, in the pairs' order.
    """
    out = np.full(len(b_rows), np.nan)
    if not len(b_rows):
        return out
    located = b.table.select(list(LOCATION)).take(b_rows).to_pydict()
    order = np.lexsort([np.asarray(located[name]) for name in reversed(LOCATION)])  # B's storage order
    chunk = max(1, budget // (int(np.prod(b.map_shape)) * 4))
    for start in range(0, len(order), chunk):
        pairs = order[start:start + chunk]
        maps_b = load_maps(b, b_rows[pairs])
        maps_a = load_maps(a, a_rows[pairs])
        for pair in pairs:
            out[pair] = rank_correlation(maps_a[int(a_rows[pair])], maps_b[int(b_rows[pair])])
    return out


def _value(section: dict, name: str):
    value = section.get(name)
    return tuple(value) if isinstance(value, list) else value


def parameter_rows(a: Run, b: Run) -> list[dict]:
    """Rows ``{"group", "name", "a", "b", "differs"}`` of the two runs' settings, side by side."""
    rows = []

    def add(group: str, sections: tuple, names) -> None:
        for name in names:
            first, second = _value(sections[0], name), _value(sections[1], name)
            rows.append({"group": group, "name": name, "a": first, "b": second,
                         "differs": group != "run" and first != second})

    manifests = (a.manifest, b.manifest)
    add("run", manifests, ("run_id", "started_at", "finished_at"))
    models = tuple(manifest.get("model") or {} for manifest in manifests)
    add("model", models, ("source", "weights", "sha256", "input_shape", "classes", "scores_from"))
    # A run made before methods existed explained the gradient.
    engines = tuple({"method": "gradient", **(manifest.get("smoothgrad") or {})} for manifest in manifests)
    add("smoothgrad", engines, dict.fromkeys([*engines[0], *engines[1]]))
    configs = tuple(manifest.get("config") or {} for manifest in manifests)
    shown = {row["name"] for row in rows}
    add("config", configs, [name for name in dict.fromkeys([*configs[0], *configs[1]])
                            if name not in shown and name not in NOT_COMPARED])
    return rows


def _count_rows(a: Run, b: Run) -> list[dict]:
    rows = []
    for name in report.COUNTS + ("errors.read", "errors.decode", "errors.explain", "invariant_holds"):
        section, field = name.split(".") if "." in name else (None, name)
        first, second = ((manifest.get(section) or {}) if section else manifest
                         for manifest in (a.manifest, b.manifest))
        rows.append({"name": name, "a": first.get(field), "b": second.get(field),
                     "differs": first.get(field) != second.get(field)})
    return rows


def _map_section(a: Run, b: Run, matching: Matching, site: pages.Site, top: int) -> dict:
    """Correlations, their histogram and the gallery of the pairs that changed most."""
    section = {"note": None, "pairs": len(matching.b_rows), "tiles": [], "src": None}
    if not len(matching.b_rows):
        section["note"] = "No (key, target) pair is in both runs: there are no maps to compare."
        return section
    if a.map_shape != b.map_shape:
        section["note"] = (f"The maps of A are stored as {a.map_shape} and those of B as {b.map_shape}: maps of "
                           "different sizes cannot be correlated, so the map comparison is skipped.")
        return section
    values = correlations(a, b, matching.a_rows, matching.b_rows)
    finite = values[np.isfinite(values)]
    section.update(mean=float(finite.mean()) if finite.size else None,
                   median=float(np.median(finite)) if finite.size else None,
                   constant=int(np.isnan(values).sum()), below=float((finite < 0.5).mean()) if finite.size else None)
    path, section["src"] = site.image("correlations.png")
    lower = max(-1.0, np.floor(finite.min() * 10) / 10) if finite.size else -1.0
    figures.histogram(path, values, "rank correlation of paired maps", (min(lower, 0.9), 1.0),
                      marks={"mean": section["mean"], "median": section["median"]})
    lowest = np.flatnonzero(np.isfinite(values))
    lowest = lowest[np.argsort(values[lowest], kind="stable")][:top]
    a_rows, b_rows = matching.a_rows[lowest], matching.b_rows[lowest]
    maps_a, maps_b = load_maps(a, a_rows), load_maps(b, b_rows)
    pictures = load_pictures(a, a_rows)
    size = input_size(a)
    for pair, row_a, row_b, values_a, values_b in zip(lowest, a_rows, b_rows, a.rows(a_rows), b.rows(b_rows)):
        path, src = site.image(f"pair-{row_b}.png")
        figures.compare_tile(path, pictures[int(row_a)], maps_a[int(row_a)], maps_b[int(row_b)], size,
                             (f"A: {a.run_id}", f"B: {b.run_id}"))
        section["tiles"].append({"src": src, "note": pictures[int(row_a)].note, **report.caption(values_a),
                                 "value": float(values[pair]), "predicted_b": values_b["predicted"]})
    return section


def build_comparison(run_a: str, run_b: str, out: str | None = None, top: int = report.DEFAULT_TOP) -> str:
    """Writes the comparison of two finished runs; returns the path of its ``index.html``.

    Args:
        run_a, run_b: the run folders (local or ``gs://``).
        out: the output folder; default ``RUN_B/compare-<run id of A>``.
        top: tiles in the gallery of the most changed maps.

    Raises:
        RunError: for an incomplete or unreadable run, or a bad option.
    """
    if top < 1:
        raise RunError(f"--top must be at least 1; got {top}")
    a, b = open_run(run_a), open_run(run_b)
    site = pages.Site(out or FileSystems.join(b.path, f"compare-{a.run_id}"))
    try:
        matching = match(a, b)
        context = {
            "title": f"SmoothGrad runs compared: {a.run_id} (A) and {b.run_id} (B)", "generated": now_utc(),
            "top": top, "a": {"id": a.run_id, "path": a.path, "classes": report.class_table(a)},
            "b": {"id": b.run_id, "path": b.path, "classes": report.class_table(b)},
            "parameters": parameter_rows(a, b), "counts": _count_rows(a, b),
            "matching": matching, "keys_listed": KEYS_LISTED, "changed_shown": CHANGED_SHOWN,
            "maps": _map_section(a, b, matching, site, top),
        }
        return site.finish("compare.html.j2", context)
    finally:
        site.close()


def parser():
    """The command line of ``smoothgrad-audit compare``."""
    command = pages.OneLineParser(
        prog=PROG, description="Compares two finished runs over the same records in a self-contained HTML page "
        "(index.html and PNGs): settings and counts side by side, per-class tables, the Spearman rank "
        "correlation of each pair of maps (rows paired on key and target), changed predictions, keys in one "
        "run only, and the maps that changed most.")
    command.add_argument("run_a", metavar="RUN_A", help="the first run folder (A), local or gs://")
    command.add_argument("run_b", metavar="RUN_B", help="the second run folder (B), local or gs://")
    command.add_argument("--out", metavar="DIR",
                         help="output folder (default: RUN_B/compare-<run id of A>); local or gs://")
    command.add_argument("--top", type=int, default=report.DEFAULT_TOP, metavar="K",
                         help=f"maps in the gallery of the most changed pairs (default {report.DEFAULT_TOP})")
    return command


def main(argv: list[str] | None = None) -> int:
    """``smoothgrad-audit compare``: writes the comparison, prints the page's path; 2 and one line on a mistake."""
    return pages.run_command(PROG, parser(), lambda args: build_comparison(args.run_a, args.run_b, args.out,
                                                                             args.top), argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
