"""The audit's checks on the corpus columns: class accuracy, border attention, unconverged maps,
confident mistakes and the error rate.

Each takes the run (:class:`pipelines.report.run_data.Run`: its manifest and
scalar columns, no map) and the rules (:func:`pipelines.audit.rules.parse`), and returns
:class:`pipelines.audit.findings.Check` entries: one per class for per-class
checks, one per run otherwise, passing or not.
"""

from __future__ import annotations

import numpy as np

from pipelines.audit.findings import MAX_KEYS, Check
from pipelines.audit.rules import status as rule_status
from pipelines.audit.rules import threshold as rule_threshold
from transforms.engine.statistics import BORDER_SHARE

def frame_share() -> float:
    """The share of an image's area in the border frame that ``border_mass`` measures."""
    inner = 1.0 - 2.0 * BORDER_SHARE
    return 1.0 - inner * inner


def _first_rows(run) -> np.ndarray:
    """Indices of each record's first map (target rank 0)."""
    return np.flatnonzero(run.values("target_rank") == 0) if run.has("target_rank") else np.arange(run.num_rows)


def class_accuracy(run, rules: dict) -> list[Check]:
    """Per labelled class: the share of its records whose clean prediction is the label."""
    first = _first_rows(run)
    labels, predicted, keys = run.values("label")[first], run.values("predicted")[first], run.values("key")[first]
    labelled = ~np.isnan(labels)
    if not labelled.any():
        return [Check("class_accuracy", "pass", "Not measured: the records carry no label.")]
    overall = float(np.mean(predicted[labelled] == labels[labelled]))
    gap = rule_threshold(rules, "class_accuracy")
    threshold = overall - gap if gap is not None else None
    checks = []
    for label in np.unique(labels[labelled]).astype(int):
        of_class = labelled & (labels == label)
        accuracy = float(np.mean(predicted[of_class] == label))
        wrong = keys[of_class & (predicted != label)]
        status = rule_status(rules, "class_accuracy", overall - accuracy)
        low = status != "pass"
        checks.append(Check(
            "class_accuracy", status, target=int(label), measure=accuracy, threshold=threshold,
            keys=list(wrong), keys_total=len(wrong),
            summary=(f"Class {label}: accuracy {accuracy:.1%} on {int(of_class.sum())} records, "
                     + (f"far below the overall {overall:.1%}; look at its mispredicted records (keys) for label "
                        "noise or a missing sub-population in training." if low
                        else f"in line with the overall {overall:.1%}."))))
    return checks


def border_attention(run, rules: dict) -> list[Check]:
    """Per explained class: its maps' mean mass in the border frame against the frame's share of the area."""
    if not run.has("border_mass"):
        return [Check("border_attention", "pass", "Not measured: the corpus has no border_mass column.")]
    share = frame_share()
    targets, border, keys = run.values("target"), run.values("border_mass"), run.values("key")
    threshold = rule_threshold(rules, "border_attention")
    checks = []
    for target in np.unique(targets[~np.isnan(targets)]).astype(int):
        of_class = (targets == target) & ~np.isnan(border)
        ratio = float(np.mean(border[of_class]) / share) if of_class.any() else float("nan")
        heavy = keys[of_class & (border >= threshold * share)] if threshold is not None else keys[:0]
        status = rule_status(rules, "border_attention", ratio)
        flagged = status != "pass"
        checks.append(Check(
            "border_attention", status, target=int(target), measure=ratio,
            threshold=threshold, keys=list(heavy), keys_total=len(heavy),
            summary=(f"Class {target}: its maps put {ratio:.2f}x the border frame's share of the area "
                     f"({share:.0%}) on the frame"
                     + ("; the model looks at image borders (padding, scanner edges, frames): check the keys' "
                        "images and crop or randomise borders in training." if flagged else ".")))
        )
    return checks


def unconverged_maps(run, rules: dict) -> list[Check]:
    """The share of maps whose estimated agreement with their converged map is below the reliability target."""
    if not run.has("reliability"):
        return [Check("unconverged_maps", "pass", "Not measured: no map has a split-half reliability (N < 2).")]
    target = float(((run.manifest.get("config") or {}).get("target_reliability")) or 0.95)
    reliability = run.values("reliability")
    measured = ~np.isnan(reliability)
    positive = np.clip(reliability, 0.0, 1.0)
    estimate = np.sqrt(2.0 * positive / (1.0 + positive))
    below = measured & (estimate < target)
    share = float(below.sum() / max(1, measured.sum()))
    status = rule_status(rules, "unconverged_maps", share)
    keys = run.values("key")[below]
    return [Check("unconverged_maps", status, measure=share, threshold=rule_threshold(rules, "unconverged_maps"),
                  keys=list(keys), keys_total=len(keys),
                  summary=(f"{share:.1%} of {int(measured.sum())} maps are estimated below {target} rank agreement "
                           "with their converged map"
                           + ("; raise samples (or use samples: auto) before trusting single maps."
                              if status != "pass" else ".")))]


def confident_mistakes(run, rules: dict) -> list[Check]:
    """Labelled records mispredicted with a score at least the median of correct predictions of that class."""
    target = str((run.manifest.get("config") or {}).get("target") or "top1")
    if not (target == "top1" or target.startswith("topk")):
        return [Check("confident_mistakes", "pass",
                      f"Not measured: with target {target} a map's score is not the prediction's.")]
    first = _first_rows(run)
    labels, predicted = run.values("label")[first], run.values("predicted")[first]
    scores, keys = run.values("score")[first], run.values("key")[first]
    labelled = ~np.isnan(labels)
    if not labelled.any():
        return [Check("confident_mistakes", "pass", "Not measured: the records carry no label.")]
    correct = labelled & (predicted == labels)
    confident = np.zeros(len(first), bool)
    for label in np.unique(predicted[labelled]):
        reference = scores[correct & (predicted == label)]
        if len(reference):
            confident |= labelled & ~correct & (predicted == label) & (scores >= np.median(reference))
    share = float(confident.sum() / labelled.sum())
    order = np.argsort(-np.where(confident, scores, -np.inf), kind="stable")[:int(confident.sum())]
    status = rule_status(rules, "confident_mistakes", share)
    flagged = status != "pass"
    return [Check("confident_mistakes", status, measure=share,
                  threshold=rule_threshold(rules, "confident_mistakes"), keys=list(keys[order]), keys_total=int(confident.sum()),
                  summary=(f"{int(confident.sum())} of {int(labelled.sum())} labelled records ({share:.1%}) are "
                           "mispredicted as confidently as typical correct predictions: possible label errors"
                           + ("; review their labels (keys, most confident first)." if flagged else ".")))]


def error_rate(run, rules: dict) -> list[Check]:
    """Records that ended as error rows, against every record read."""
    manifest = run.manifest
    read, errors = int(manifest.get("records_read") or 0), int(manifest.get("errors_total") or 0)
    rate = errors / read if read else 0.0
    status = rule_status(rules, "error_rate", rate)
    by_stage = ", ".join(f"{count} at {stage}" for stage, count in (manifest.get("errors") or {}).items() if count)
    keys = []
    if errors:
        from pipelines.report.run_data import read_errors

        keys = [row["key"] for row in read_errors(run, MAX_KEYS)[0]]
    return [Check("error_rate", status, measure=rate, threshold=rule_threshold(rules, "error_rate"), keys=keys,
                  keys_total=errors,
                  summary=(f"{errors} of {read} records ({rate:.1%}) ended as error rows"
                           + (f" ({by_stage}); read the errors files for each record's reason." if errors else ".")))]


def corpus_checks(run, rules: dict) -> list[Check]:
    """Every check on the corpus columns."""
    checks = []
    for check in (error_rate, class_accuracy, border_attention, unconverged_maps, confident_mistakes):
        checks += check(run, rules)
    return checks
