"""Drift against a previous run: whether the model's reasons moved since then.

A scheduled audit of the same model on mostly the same records should find
the same maps; a retrained model, changed preprocessing or another data source
moves them. :func:`drift_checks` compares two finished runs
(:class:`pipelines.report.run_data.Run`) from what each already holds: the
class saliency means and the per-class samples of pooled maps in ``_audit/``
(:mod:`transforms.audit.read`), the corpus's scalar columns, and the previous
run's ``_FINDINGS.json``:

* ``drift_class_mean``, per class in both runs: Spearman rank correlation of
  the two class mean maps; the difference map is evidence.
* ``drift_map_agreement``, per run: the rank correlation of each map sampled in
  both runs (same key and class; the samples are chosen by key hash with the
  seed, so the same records give the same keys); its median.
* ``drift_prediction_flips``, per run: the share of records in both corpora
  whose predicted class changed.
* ``drift_statistics``, per class: a two-sample Kolmogorov-Smirnov test of each
  map statistic, with Cliff's delta as its effect size.
* ``drift_new_shortcut``, per run: failing shortcut regions of this run that the
  previous run did not fail at an overlapping place (IoU > :data:`OVERLAP`).

:func:`drift_since` finds the previous run (``compare_with``, the run's config,
its baseline) and says in one entry why there is none.
"""

from __future__ import annotations

import collections

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.audit import findings
from pipelines.audit.findings import MAX_KEYS, Check
from pipelines.audit.regions import box_iou as iou
from pipelines.audit.rules import status as rule_status
from pipelines.audit.rules import threshold as rule_threshold
from pipelines.report.run_data import RunError, open_run
from transforms.audit.pooling import unit_mass_pooled
from transforms.audit.read import AuditReadError, read_class_saliency, read_grid, read_samples
from transforms.engine.statistics import rank_correlation
from transforms.support.errors import one_line

#: Map statistic columns compared per class. ``score`` is left out: it is the model's output, not its map,
#: and its scale moves with any retraining (prediction changes are drift_prediction_flips).
STATISTICS = ("entropy", "gini", "com_y", "com_x", "border_mass", "reliability")
#: A failing shortcut region counts as the previous run's when their boxes overlap by more than this IoU.
OVERLAP = 0.3
#: Values per run below which a statistic of a class is not tested.
MIN_VALUES = 2
#: Settings that decide how converged a map is: ``reliability`` is compared only when both runs share them
#: (more samples raise it without moving the maps: measured on the demo, N 20 → 50 gave Cliff's delta 0.7-0.9).
ESTIMATE_SETTINGS = ("samples", "min_samples", "max_samples", "target_reliability", "noise", "noise_mode",
                     "variant", "method", "ig_steps", "ig_baseline", "gradcam_layer")


def _name(previous) -> str:
    return f"run {previous.run_id}"


# ------------------------------------------------------------------ the pooled maps on one grid
def _factors(run, previous) -> tuple[tuple[int, int] | None, str]:
    """Sum-pooling factors that bring both runs' pooled maps to one grid; or None and why they cannot be."""
    if not run.manifest.get("audit") or not previous.manifest.get("audit"):
        return None, f"{'this' if not run.manifest.get('audit') else 'the previous'} run has no _audit/ data"
    here, there = read_grid(run.manifest), read_grid(previous.manifest)
    coarse = max(here.cell, there.cell)
    if tuple(here.input_shape) != tuple(there.input_shape) or coarse % here.cell or coarse % there.cell:
        return None, (f"their audit grids do not nest ({here.cell} and {there.cell} input pixels per cell, inputs "
                      f"{list(here.input_shape)} and {list(there.input_shape)})")
    return (coarse // here.cell, coarse // there.cell), ""


def _on_grid(pooled: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return np.asarray(pooled, np.float64)
    return unit_mass_pooled(pooled, factor).astype(np.float64)


# ------------------------------------------------------------------ the checks
def class_means(run, previous, rules: dict, factors, agreement: dict) -> tuple[list[Check], dict, dict]:
    """``drift_class_mean`` per class: the rank correlation of the class's mean map with the previous run's."""
    here = {entry.target: entry for entry in read_class_saliency(run.path, run.manifest) if entry.group == "all"}
    there = {entry.target: entry for entry in read_class_saliency(previous.path, previous.manifest)
             if entry.group == "all"}
    threshold, name = rule_threshold(rules, "drift_class_mean"), _name(previous)
    checks, evidence, arrays = [], {}, {}
    for target in sorted(here.keys() | there.keys()):
        if target not in there or target not in here:
            where = "this run" if target in here else name
            checks.append(Check("drift_class_mean", "pass", target=target, summary=(
                f"Class {target}: explained only in {where} ({(here.get(target) or there[target]).count} maps); "
                "no mean map to compare it with.")))
            evidence[str(target)] = {"count": here[target].count if target in here else 0,
                                     "previous_count": there[target].count if target in there else 0}
            continue
        current, before = _on_grid(here[target].mean, factors[0]), _on_grid(there[target].mean, factors[1])
        correlation = rank_correlation(current, before)
        moved = 0.5 * float(np.abs(current - before).sum())  # the share of unit mass that changed place
        arrays[f"drift_class_{target}_previous"] = before.astype(np.float32)
        arrays[f"drift_class_{target}_difference"] = (current - before).astype(np.float32)
        changed = agreement.get(target, [])
        status = rule_status(rules, "drift_class_mean", correlation)
        counts = f"{moved:.0%} of its saliency moved; {here[target].count} maps here, {there[target].count} there"
        if correlation != correlation:
            summary = f"Class {target}: not measured (a mean map is constant: {counts})."
        elif status == "pass":
            summary = (f"Class {target}: its mean map ranks the image's regions as in {name} (rank correlation "
                       f"{correlation:.3f}; {counts}).")
        else:
            summary = (f"Class {target}: its mean map moved since {name} (rank correlation {correlation:.3f}; "
                       f"{counts}): a retrained model, other preprocessing or new data; the report's difference "
                       "map shows in red where the class now looks more.")
        checks.append(Check("drift_class_mean", status, target=target, measure=correlation, threshold=threshold,
                            keys=changed, keys_total=len(changed), summary=summary))
        evidence[str(target)] = {"count": here[target].count, "previous_count": there[target].count,
                                 "rank_correlation": None if correlation != correlation else correlation,
                                 "moved": moved, "status": status}
    return checks, evidence, arrays


def map_agreement(run, previous, rules: dict, factors) -> tuple[list[Check], dict, dict, dict]:
    """``drift_map_agreement``: each map sampled in both runs against the previous run's; also the changed keys
    per class, worst first."""
    here = {(target, sample.key): sample.pooled for target, samples in read_samples(run.path, run.manifest).items()
            for sample in samples}
    there = {(target, sample.key): sample.pooled
             for target, samples in read_samples(previous.path, previous.manifest).items() for sample in samples}
    pairs = sorted(here.keys() & there.keys())
    values = np.array([rank_correlation(_on_grid(here[pair], factors[0]), _on_grid(there[pair], factors[1]))
                       for pair in pairs], np.float64)
    limit, threshold = rules["drift_map_agreement"]["agreement"], rule_threshold(rules, "drift_map_agreement")
    finite = np.isfinite(values)
    evidence = {"pairs": len(pairs), "constant": int((~finite).sum()), "agreement": limit, "median": None,
                "below": None}
    if not finite.any():
        seeds = [(entry.manifest.get("config") or {}).get("seed") for entry in (run, previous)]
        why = (f" (their seeds differ, {seeds[0]} here and {seeds[1]} there, so other keys were sampled)"
               if seeds[0] != seeds[1] else "")
        return [Check("drift_map_agreement", "pass", summary=(
            f"Not measured: no map of the same key and class is in both runs' samples{why}."
            if not pairs else "Not measured: every map sampled in both runs is constant."))], evidence, {}, {}
    median, below = float(np.median(values[finite])), float(np.mean(values[finite] < limit))
    order = [index for index in np.argsort(np.where(finite, values, np.inf), kind="stable") if values[index] < limit]
    keys = list(dict.fromkeys(pairs[index][1] for index in order))
    per_class = collections.defaultdict(list)
    for index in order:
        per_class[pairs[index][0]].append(pairs[index][1])
    evidence.update(median=median, below=below)
    status = rule_status(rules, "drift_map_agreement", median)
    summary = (f"Over {int(finite.sum())} maps sampled in both runs (same key and class), the median rank "
               f"correlation with {_name(previous)}'s map is {median:.3f}; {below:.0%} are below {limit:g}")
    summary += ("; the model's reasons changed record by record: look at the keys (worst first), or run "
                f"'smoothgrad-audit compare {previous.path} {run.path}' for every map." if status != "pass" else ".")
    check = Check("drift_map_agreement", status, measure=median, threshold=threshold, keys=keys,
                  keys_total=len(keys), summary=summary)
    return [check], evidence, {"drift_agreement": values.astype(np.float32)}, dict(per_class)


def _first_predictions(run) -> dict:
    """``{key: (predicted, label)}`` of each record's first map (target rank 0)."""
    keys, predicted, labels = run.values("key"), run.values("predicted"), run.values("label")
    rows = np.flatnonzero(run.values("target_rank") == 0) if run.has("target_rank") else np.arange(run.num_rows)
    found = {}
    for row in rows:
        found.setdefault(keys[row], (int(predicted[row]), None if np.isnan(labels[row]) else int(labels[row])))
    return found


def prediction_flips(run, previous, rules: dict) -> tuple[list[Check], dict]:
    """``drift_prediction_flips``: the share of records in both corpora whose predicted class changed."""
    here, there = _first_predictions(run), _first_predictions(previous)
    both = sorted(here.keys() & there.keys())
    only = f"{len(here.keys() - there.keys())} records are new here, {len(there.keys() - here.keys())} are gone"
    evidence = {"records": len(both), "only_here": len(here.keys() - there.keys()),
                "only_previous": len(there.keys() - here.keys()), "flipped": 0, "transitions": []}
    if not both:
        return [Check("drift_prediction_flips", "pass", summary=(
            f"Not measured: no record key is in both corpora ({only})."))], evidence
    flipped = [key for key in both if here[key][0] != there[key][0]]
    share = len(flipped) / len(both)
    transitions = collections.Counter((there[key][0], here[key][0]) for key in flipped)
    labelled = [key for key in flipped if here[key][1] is not None]
    now_right = sum(here[key][0] == here[key][1] for key in labelled)
    now_wrong = sum(there[key][0] == here[key][1] for key in labelled)
    evidence.update(flipped=len(flipped), now_right=now_right, now_wrong=now_wrong,
                    transitions=[[before, after, count] for (before, after), count in transitions.most_common(20)])
    status = rule_status(rules, "drift_prediction_flips", share)
    common = ", ".join(f"{before} → {after} ({count})" for (before, after), count in transitions.most_common(3))
    summary = (f"{len(flipped)} of {len(both)} records in both runs ({share:.1%}) changed their predicted class "
               f"since {_name(previous)}" + (f" (most often {common}" + (
                   f"; {now_right} now right and {now_wrong} now wrong against their labels" if labelled else "")
                   + ")" if flipped else "") + f"; {only}"
               + (": the model changed; check the keys before trusting old findings." if status != "pass" else "."))
    return [Check("drift_prediction_flips", status, measure=share, threshold=rule_threshold(
        rules, "drift_prediction_flips"), keys=flipped, keys_total=len(flipped), summary=summary)], evidence


def cliffs_delta(first: np.ndarray, second: np.ndarray) -> float:
    """Cliff's delta: P(a value of ``first`` > one of ``second``) − P(<), in [-1, 1] (ties count half each way).

    Example:
        >>> cliffs_delta(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
        1.0
    """
    from scipy import stats as scipy_stats  # here: its import costs a run without drift checks 0.4 s

    ranks = scipy_stats.rankdata(np.concatenate([first, second]))
    wins = ranks[:len(first)].sum() - len(first) * (len(first) + 1) / 2.0  # Mann-Whitney U of first
    return float(2.0 * wins / (len(first) * len(second)) - 1.0)


def _grouped(run) -> dict:
    targets = run.values("target")
    return {int(target): np.flatnonzero(targets == target) for target in np.unique(targets[~np.isnan(targets)])}


def statistics(run, previous, rules: dict) -> tuple[list[Check], dict]:
    """``drift_statistics`` per class: each map statistic's shift (KS test, Cliff's delta)."""
    from scipy import stats as scipy_stats

    p_value, name = rules["drift_statistics"]["p_value"], _name(previous)
    settings = [{key: (entry.manifest.get("config") or {}).get(key) for key in ESTIMATE_SETTINGS}
                for entry in (run, previous)]
    differ = [key for key in ESTIMATE_SETTINGS if settings[0][key] != settings[1][key]]
    columns = [column for column in STATISTICS if run.has(column) and previous.has(column)
               and not (column == "reliability" and differ)]
    here_rows, there_rows = _grouped(run), _grouped(previous)
    values = {column: (run.values(column), previous.values(column)) for column in columns}
    checks, evidence = [], {}
    for target in sorted(here_rows.keys() & there_rows.keys()):
        shifts = []
        for column in columns:
            first, second = values[column][0][here_rows[target]], values[column][1][there_rows[target]]
            first, second = first[np.isfinite(first)], second[np.isfinite(second)]
            if len(first) < MIN_VALUES or len(second) < MIN_VALUES:
                continue
            test = scipy_stats.ks_2samp(first, second)
            shifts.append({"statistic": column, "median": float(np.median(first)),
                           "previous_median": float(np.median(second)), "delta": cliffs_delta(first, second),
                           "p_value": float(test.pvalue), "values": len(first), "previous_values": len(second)})
        evidence[str(target)] = shifts
        skipped = (f"; reliability not compared: the runs' {', '.join(differ)} differ" if differ and run.has(
            "reliability") else "")
        if not shifts:
            checks.append(Check("drift_statistics", "pass", target=target, summary=(
                f"Class {target}: not measured (fewer than {MIN_VALUES} values of each map statistic in a run).")))
            continue
        shifted = sorted((shift for shift in shifts if shift["p_value"] < p_value), key=lambda shift: -abs(
            shift["delta"]))
        measure = abs(shifted[0]["delta"]) if shifted else 0.0
        status = rule_status(rules, "drift_statistics", measure)
        if shifted:
            top = shifted[0]
            summary = (f"Class {target}: {top['statistic']} shifted since {name} (median {top['median']:.4g} here, "
                       f"{top['previous_median']:.4g} there; Cliff's delta {top['delta']:+.2f}, KS p = "
                       f"{top['p_value']:.2g})" + (f"; {len(shifted) - 1} more statistic"
                                                   f"{'s' if len(shifted) > 2 else ''} shifted" if len(shifted) > 1
                                                   else ""))
            summary += skipped + ("; the maps changed in kind (spread, place, border): compare the class's mean "
                                  "maps." if status != "pass" else "; a small effect.")
        else:
            summary = (f"Class {target}: no map statistic shifted since {name} (KS p ≥ {p_value:g} for "
                       f"{', '.join(shift['statistic'] for shift in shifts)}){skipped}.")
        checks.append(Check("drift_statistics", status, target=target, measure=measure,
                            threshold=rule_threshold(rules, "drift_statistics"), summary=summary))
    return checks, evidence


def new_shortcuts(checks: list[Check], previous, rules: dict) -> tuple[list[Check], dict]:
    """``drift_new_shortcut``: this run's failing shortcut regions the previous run did not fail nearby."""
    ignored = set(rules["drift_new_shortcut"]["ignore_classes"])
    failing = [check for check in checks if check.check == "shortcut_region" and check.status == "fail"
               and check.region is not None and check.target not in ignored]
    threshold = rule_threshold(rules, "drift_new_shortcut")
    if not failing:
        return [Check("drift_new_shortcut", "pass", measure=0.0, threshold=threshold,
                      summary="No shortcut region fails in this run, so none is new.")], {"new": []}
    try:
        document = findings.read(previous.path)
    except (OSError, ValueError) as error:
        document, why = None, f"its {findings.FINDINGS} cannot be read ({type(error).__name__})"
    else:
        why = f"it has no {findings.FINDINGS} (it was not audited)"
    if not isinstance(document, dict) or not isinstance(document.get("checks"), list):
        return [Check("drift_new_shortcut", "pass", summary=(
            f"Not measured: {len(failing)} shortcut region{'s' if len(failing) > 1 else ''} fail here, but "
            f"{_name(previous)} cannot say which are new: {why}."))], {"new": []}
    before = [entry for entry in document["checks"] if isinstance(entry, dict)
              and entry.get("check") == "shortcut_region" and entry.get("status") == "fail"
              and isinstance(entry.get("region"), list) and len(entry["region"]) == 4]
    new = [check for check in failing if not any(
        entry.get("class") == check.target and iou(entry["region"], check.region) > OVERLAP for entry in before)]
    status = rule_status(rules, "drift_new_shortcut", float(len(new)))
    keys = [key for check in new for key in check.keys][:MAX_KEYS]
    where = "; ".join(f"class {check.target} at {check.region}" for check in new)
    summary = (f"{len(new)} failing shortcut region{' is' if len(new) == 1 else 's are'} new since "
               f"{_name(previous)} ({where}{f'; {len(failing)} fail in all' if len(failing) > len(new) else ''}): "
               "the model picked up a shortcut it did not use before; look at what its training data gained."
               if new else
               f"The {len(failing)} failing shortcut region{'s' if len(failing) > 1 else ''} already failed in "
               f"{_name(previous)} at the same place: not new (see shortcut_region).")
    return [Check("drift_new_shortcut", status, measure=float(len(new)), threshold=threshold, keys=keys,
                  keys_total=sum(check.keys_total or len(check.keys) for check in new), summary=summary)], {
        "new": [{"class": check.target, "region": check.region} for check in new]}


def drift_checks(run, previous, rules: dict, checks: list[Check] | None = None) -> tuple[list[Check], dict, dict]:
    """Every drift check of ``run`` against ``previous``.

    Args:
        run, previous: two finished runs (:func:`pipelines.report.run_data.open_run`).
        rules: the parsed audit rules (:func:`pipelines.audit.rules.parse`).
        checks: this run's other checks, whose failing ``shortcut_region`` entries drift_new_shortcut looks at;
            None: those of its ``_FINDINGS.json``.

    Returns:
        (the checks, JSON-able evidence, float32 arrays for the report: ``drift_class_<k>_previous`` and
        ``drift_class_<k>_difference`` (this run's mean minus the previous one's), ``drift_agreement``).
    """
    if checks is None:
        stored = findings.read(run.path) or {"checks": []}
        checks = [Check(entry["check"], entry["status"], entry.get("summary") or "", target=entry.get("class"),
                        region=entry.get("region"), keys=entry.get("keys") or [], keys_total=entry.get("keys_total"))
                  for entry in stored["checks"]]
    out, arrays = [], {}
    evidence = {"previous": {"run_id": previous.run_id, "path": previous.path}}
    factors, why = _factors(run, previous)
    if factors is None:
        for name in ("drift_class_mean", "drift_map_agreement"):
            out.append(Check(name, "pass", f"Not measured against {_name(previous)}: {why}."))
    else:
        agreement, evidence["agreement"], agreement_arrays, changed = map_agreement(run, previous, rules, factors)
        means, evidence["classes"], mean_arrays = class_means(run, previous, rules, factors, changed)
        out += means + agreement
        arrays.update(mean_arrays)
        arrays.update(agreement_arrays)
    flips, evidence["flips"] = prediction_flips(run, previous, rules)
    shifts, evidence["statistics"] = statistics(run, previous, rules)
    shortcuts, evidence["shortcuts"] = new_shortcuts(checks, previous, rules)
    return out + flips + shifts + shortcuts, evidence, arrays


# ------------------------------------------------------------------ which previous run
def previous_run(run, compare_with: str | None = None):
    """The run to compare ``run`` with, or None and the one entry that says why there is none.

    Args:
        run: this run.
        compare_with: a run folder, or ``latest`` (the most recently finished completed run under this run's
            output folder, this run excluded, finished by the time this one did); None: the run config's
            ``compare_with``, else the run's baseline, else none.

    Returns:
        ``(Run, None)`` or ``(None, Check)``: a passing ``drift_class_mean`` entry when nothing was asked for, a
        warning when the run asked for cannot be used.
    """
    from pipelines.run.baseline import _latest  # it loads the run config, and TensorFlow with it
    baseline = (run.manifest.get("baseline") or {}).get("path")
    configured = (run.manifest.get("config") or {}).get("compare_with")
    setting, source = next(((value, name) for value, name in ((compare_with, "compare_with"),
                                                              (configured, "the run's compare_with"),
                                                              (baseline, "the run's baseline")) if value),
                           (None, None))
    if setting is None:
        return None, Check("drift_class_mean", "pass", "Not measured: no previous run to compare with (set "
                                                       "compare_with).")
    try:
        if setting == "latest":
            output = FileSystems.split(run.path)[0]
            found = _latest(output, run.run_id, run.manifest.get("finished_at"))
            if found is None:
                return None, Check("drift_class_mean", "pass", f"Not measured: {source} is 'latest', and {output} "
                                                               "holds no other completed run finished before this one.")
            setting = found
        if setting.rstrip("/") == run.path.rstrip("/"):
            return None, Check("drift_class_mean", "warn", f"Not measured: {source} names this run's own folder "
                                                           f"({setting}); name an earlier run.")
        return open_run(setting), None
    except (RunError, OSError, ValueError) as error:
        return None, Check("drift_class_mean", "warn", f"Not measured: {source} names {setting}, which cannot be "
                                                       f"compared with: {one_line(error)}.")


def drift_since(run, compare_with: str | None, rules: dict, checks: list[Check]) -> tuple[list[Check], dict, dict]:
    """The drift checks against the previous run :func:`previous_run` finds, or the one entry saying why none."""
    previous, why = previous_run(run, compare_with)
    if previous is None:
        return [why], {}, {}
    try:
        return drift_checks(run, previous, rules, checks)
    except (AuditReadError, RunError, OSError) as error:  # a damaged previous run: say so, audit the rest
        return [Check("drift_class_mean", "warn", f"Not measured: {_name(previous)} cannot be compared with: "
                                                  f"{one_line(error)}.")], {}, {}
