"""The audit on data it was not tuned on: planted shortcuts across tasks, marks, places, classes and models.

For each variant (task × mark kind × place × shortcut class × architecture)
this script makes the planted-shortcut dataset and its clean twin with their
models (``pipelines.demo.planted``), runs the pipeline with the audit on each
twin's test split::

    python -m pipelines.smoothgrad_audit --input TWIN/test-*.tfrecord --output RUNS/TWIN
        --model TWIN/model.keras --id_feature image/id --samples 20 --batch_size 16

and reads the run's ``_FINDINGS.json``. Per variant it reports:

* ``reliance``: how much the planted model uses the mark (pasting it onto
  other classes' images: the share flipped into the shortcut class), so a miss
  on a model that never learnt the mark is not blamed on the audit;
* ``found``: a ``shortcut_region`` finding for the shortcut class at status
  warn or fail; for the best one (highest IoU with the planted box), the IoU,
  ``region_in_box`` (share of the finding's region inside the box),
  ``box_in_region`` (share of the box the region covers), the precision and
  recall of its ``keys`` against the records carrying the mark, and
  ``confirmed``;
* ``box_mass_marked`` / ``box_mass_others``: from the corpus itself, the
  share of |saliency| inside the box on the records carrying the mark and on
  the others (``clean_box_mass_marked``: the clean twin's maps of the same
  records), against ``box_area_share``; a miss with maps that do show the mark
  is the audit's;
* ``clean_false_alarms``: the clean twin's ``shortcut_region`` findings at warn
  or fail, of any class (there must be none).

Data, models and runs are cached in ``benchmarks/.cache/planted/<variant>/``
(gitignored); a variant whose ground truth and run are up to date is not made
again. ``--no-audit`` runs the pipeline with ``--audit=false`` (no findings to
read: the table then shows the data and the models only); ``--no-run`` stops
after the models.

Example (from the repository root; each variant takes a few minutes on 2 CPU cores)::

    python benchmarks/planted.py                              # every default variant
    python benchmarks/planted.py --variants shapes-patch-tl-cnn_max,gratings-barcode-tr-residual
    python benchmarks/planted.py --list
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.demo.planted import PlantedSpec, make_planted  # noqa: E402
from pipelines.demo.planted_marks import box_iou  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "planted"
RUN_ID = "planted"
ALERT = ("warn", "fail")

# Varied on purpose: both tasks, every mark kind, corners and free places,
# different shortcut classes and class counts, every architecture family. The
# global-average-pooling families (strided_gap, residual) go on the gratings:
# with the default budget they did not learn the shapes (a strided_gap clean
# twin stayed at chance, 0.24), so a miss there would say nothing of the audit.
# With full-contrast gratings every model read the orientation alone and
# ignored the mark (pasting it flipped under 8 %): the gratings variants draw
# each object with a contrast between GRATINGS_CONTRAST's bounds (every class
# alike, PlantedSpec.object_contrast), so the mark is the easier evidence on the
# faint ones. Measured on gratings3-ring-free-cnn_max (planted model only):
# (0.1, 1) flipped 0.29 (partial) with 0.96 accuracy without marks; (0.05, 0.4)
# flipped 1.0 but the model never learnt the gratings (0.36, chance 0.33).
GRATINGS_CONTRAST = (0.05, 0.7)
VARIANTS = {
    "shapes-patch-tl-cnn_max": dict(task="shapes", mark="patch", place="top-left", shortcut_class=0,
                                    architecture="cnn_max"),
    "gratings-ring-br-strided_gap": dict(task="gratings", mark="ring", place="bottom-right", shortcut_class=2,
                                         architecture="strided_gap", object_contrast=GRATINGS_CONTRAST),
    "gratings-barcode-tr-residual": dict(task="gratings", mark="barcode", place="top-right", shortcut_class=1,
                                         architecture="residual", object_contrast=GRATINGS_CONTRAST),
    "gratings-glyph-bl-flatten_dense": dict(task="gratings", mark="glyph", place="bottom-left", shortcut_class=3,
                                            architecture="flatten_dense", object_contrast=GRATINGS_CONTRAST),
    "shapes-glyph-free-cnn_max": dict(task="shapes", mark="glyph", place=(20, 40), shortcut_class=3,
                                      architecture="cnn_max"),
    "gratings3-ring-free-cnn_max": dict(task="gratings", classes=3, mark="ring", place=(40, 6), shortcut_class=0,
                                        architecture="cnn_max", object_contrast=GRATINGS_CONTRAST),
    "gratings48-barcode-tr-strided_gap-noisy": dict(task="gratings", image_size=48, mark="barcode",
                                                    place="top-right", shortcut_class=1, share=0.6,
                                                    other_share=0.05, architecture="strided_gap",
                                                    object_contrast=GRATINGS_CONTRAST),
}


def run_pipeline(twin_dir: Path, run_root: Path, audit: bool, rerun: bool = False) -> Path:
    """Runs the pipeline on a twin's test split (skipped when the same run is there already); returns the run folder."""
    run_dir = run_root / f"run_id={RUN_ID}"
    with open(twin_dir / "ground_truth.json", encoding="utf-8") as handle:
        stamp = {"model_parameters": json.load(handle)["parameters"], "audit": audit}
    stamp_path = run_root / "run_stamp.json"
    done = (run_dir / ("_FINDINGS.json" if audit else "_MANIFEST.json")).exists()
    if not rerun and done and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return run_dir
    command = [sys.executable, "-m", "pipelines.smoothgrad_audit", "--input", str(twin_dir / "test-*.tfrecord"),
               "--output", str(run_root), "--model", str(twin_dir / "model.keras"), "--id_feature", "image/id",
               "--samples", "20", "--batch_size", "16", "--run_id", RUN_ID, "--overwrite=true",
               f"--audit={'true' if audit else 'false'}"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"the pipeline failed on {twin_dir} ({finished.returncode}):\n{finished.stderr[-3000:]}")
    run_root.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return run_dir


def _area(box) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def _intersection(first, second) -> int:
    return _area((max(first[0], second[0]), max(first[1], second[1]), min(first[2], second[2]),
                  min(first[3], second[3])))


def score_findings(findings: dict, truth: dict) -> dict:
    """Scores a planted run's ``_FINDINGS.json`` against the variant's ground truth.

    Args:
        findings: the parsed ``_FINDINGS.json`` (``checks``: ``check``, ``status``, ``class``, ``region``,
            ``confirmed``, ``keys``, ``keys_total``, ...).
        truth: the planted twin's ``ground_truth.json``.

    Returns:
        ``found`` (a shortcut-region finding for the shortcut class at warn or fail), and for the best one
        (highest IoU) ``status``, ``region``, ``iou``, ``region_in_box``, ``box_in_region``, ``precision``,
        ``recall``, ``confirmed``, ``keys_total``; ``other_class_alerts`` counts region alerts on other classes.
    """
    box, planted = truth["box"], set(truth["planted_keys"])
    alerts = [check for check in findings.get("checks", [])
              if check.get("check") == "shortcut_region" and check.get("status") in ALERT]
    mine = [check for check in alerts if check.get("class") == truth["shortcut_class"]]
    result = {"run_status": findings.get("status"), "found": bool(mine), "other_class_alerts": len(alerts) - len(mine)}
    if not mine:
        return result
    best = max(mine, key=lambda check: box_iou(check["region"], box) if check.get("region") else -1.0)
    region = best.get("region")
    keys = set(best.get("keys") or [])
    hits = len(keys & planted)
    result.update({
        "status": best["status"], "region": region, "confirmed": best.get("confirmed"),
        "iou": round(box_iou(region, box), 3) if region else 0.0,
        "region_in_box": round(_intersection(region, box) / _area(region), 3) if region and _area(region) else 0.0,
        "box_in_region": round(_intersection(region, box) / _area(box), 3) if region else 0.0,
        # keys hold at most 1000 of keys_total: precision is on the keys given, recall as far as they go.
        "precision": round(hits / len(keys), 3) if keys else None,
        "recall": round(hits / len(planted), 3) if planted else None,
        "keys_total": best.get("keys_total"),
    })
    return result


def clean_alarms(findings: dict) -> list[dict]:
    """The clean twin's shortcut-region findings at warn or fail (class, region, status): there must be none."""
    return [{"class": check.get("class"), "region": check.get("region"), "status": check["status"]}
            for check in findings.get("checks", [])
            if check.get("check") == "shortcut_region" and check.get("status") in ALERT]


def corpus_box_mass(run_dir: Path, truth: dict) -> dict:
    """From the corpus itself: the mean share of |saliency| inside the planted box, on the records carrying the
    mark and on the others (the box's area share is chance), and the records explained.

    It tells a miss of the audit from maps that do not show the mark at all.
    """
    import numpy as np
    import pyarrow.parquet as pq

    manifest = json.loads((run_dir / "_MANIFEST.json").read_text())
    table = pq.read_table(sorted(str(path) for path in run_dir.glob("saliency-*.parquet")),
                          columns=["key", "saliency", "height", "width"])
    y0, x0, y1, x1 = truth["box"]
    marked = set(truth.get("planted_keys") or truth.get("mark_keys_in_planted") or [])
    shares = {True: [], False: []}
    for row in table.to_pylist():
        saliency = np.abs(np.asarray(row["saliency"], np.float32)).reshape(row["height"], row["width"], -1).sum(-1)
        shares[row["key"] in marked].append(float(saliency[y0:y1, x0:x1].sum() / max(saliency.sum(), 1e-30)))
    size = truth["image_size"]
    return {"explained": f"{manifest['records_explained']}/{manifest['records_read']}",
            "box_mass_marked": round(float(np.mean(shares[True])), 4) if shares[True] else None,
            "box_mass_others": round(float(np.mean(shares[False])), 4) if shares[False] else None,
            "box_area_share": round((y1 - y0) * (x1 - x0) / size ** 2, 4)}


def _read_findings(run_dir: Path) -> dict | None:
    path = run_dir / "_FINDINGS.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_variant(name: str, options: dict, args) -> dict:
    """Makes (or reuses) one variant's twins and models, runs the pipeline on both, scores the findings."""
    spec = PlantedSpec(**{**options, "train": args.train, "test": args.test, "epochs": args.epochs,
                          "seed": args.seed})
    folder = CACHE / name
    truths = make_planted(spec, str(folder))
    planted, clean = truths["planted"], truths["clean"]
    row = {"variant": name, "task": spec.task, "classes": spec.classes, "mark": spec.mark,
           "place": planted["mark_place"], "box": planted["box"], "shortcut_class": spec.shortcut_class,
           "architecture": spec.architecture, "object_contrast": list(spec.object_contrast),
           "test_accuracy": planted["test_accuracy"],
           "clean_test_accuracy": clean["test_accuracy"], "flipped_share": planted["reliance"]["flipped_share"],
           "clean_flipped_share": clean["reliance"]["flipped_share"], "reliance": planted["reliance"]["verdict"],
           "accuracy_drop": planted["reliance"]["accuracy_drop"], "planted_test_keys": len(planted["planted_keys"])}
    if args.no_run:
        return row
    audit = not args.no_audit
    runs = {twin: run_pipeline(folder / twin, folder / "runs" / twin, audit, args.rerun) for twin in ("planted", "clean")}
    row["runs"] = {twin: str(path) for twin, path in runs.items()}
    corpus = corpus_box_mass(runs["planted"], planted)
    row.update(corpus)
    # The clean twin's maps on the same records (never marked there): the box should hold about chance.
    row["clean_box_mass_marked"] = corpus_box_mass(runs["clean"], clean)["box_mass_marked"]
    if not audit:
        return row
    planted_findings, clean_findings = _read_findings(runs["planted"]), _read_findings(runs["clean"])
    if planted_findings is None or clean_findings is None:
        row["error"] = "no _FINDINGS.json in the run folder (is the findings engine in this version?)"
        return row
    row.update(score_findings(planted_findings, planted))
    row["clean_false_alarms"] = clean_alarms(clean_findings)
    row["passed"] = row["found"] and row["iou"] > 0 and not row["clean_false_alarms"]
    return row


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return str(len(value)) if value and isinstance(value[0], dict) else str(value)
    return str(value)


def table(rows: list[dict]) -> str:
    """The rows as a markdown table (the columns that any row has)."""
    columns = ["variant", "box", "test_accuracy", "clean_test_accuracy", "flipped_share", "clean_flipped_share",
               "reliance", "explained", "box_area_share", "box_mass_marked", "box_mass_others",
               "clean_box_mass_marked", "found", "status", "iou", "region_in_box", "box_in_region", "precision", "recall",
               "confirmed", "clean_false_alarms", "passed", "error"]
    columns = [column for column in columns if any(column in row for row in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the variants and stop")
    parser.add_argument("--train", type=int, default=PlantedSpec.train)
    parser.add_argument("--test", type=int, default=PlantedSpec.test)
    parser.add_argument("--epochs", type=int, default=PlantedSpec.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-audit", action="store_true", help="run the pipeline with --audit=false (no findings)")
    parser.add_argument("--no-run", action="store_true", help="make the data and models only")
    parser.add_argument("--rerun", action="store_true", help="run the pipeline even when a cached run is up to date")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "planted.json"), help="where to write the rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.list:
        for name, options in VARIANTS.items():
            print(f"{name}: {options}")
        return []
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; --list shows them")
    rows = []
    for name in names:
        rows.append(run_variant(name, VARIANTS[name], args))
        print(f"{name}: done", file=sys.stderr, flush=True)
    Path(args.json).write_text(json.dumps({"settings": {key: value for key, value in vars(args).items()
                                                        if key not in ("json", "list")}, "rows": rows},
                                          indent=2) + "\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
