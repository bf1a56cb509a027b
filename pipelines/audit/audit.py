"""The audit of a finished run: every check, the evidence behind it, and ``_FINDINGS.json``.

Runs on the launcher after the pipeline (``audit: true``, the default), or on
any finished run. It reads only small things: the manifest, the corpus's
scalar columns, and what the pipeline put in ``_audit/`` (class saliency means
and a bounded sample of pooled maps per class); for a shortcut candidate it
re-reads a bounded sample of records and runs the model on them.

Per class: strategy clusters (:mod:`pipelines.audit.clusters`), a shortcut
candidate region (:mod:`pipelines.audit.regions`) confirmed or not by
counterfactuals (:mod:`pipelines.audit.counterfactual`); per class and per run:
the corpus checks (:mod:`pipelines.audit.checks`); against a previous run: the
drift checks (:mod:`pipelines.audit.drift`). The evidence the report draws
(class and cluster mean maps, candidate regions, counterfactual figures, drift
since the previous run) goes to ``_audit/evidence.json`` and ``_audit/evidence.npz``.

Example:
>>> document = audit_run("demo_output/run_id=demo")
>>> document["status"], [check["check"] for check in document["checks"] if check["status"] != "pass"]
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.audit import findings
from pipelines.audit import rules as audit_rules
from pipelines.audit.checks import corpus_checks
from pipelines.audit.clusters import strategy_clusters
from pipelines.audit.counterfactual import Probabilities, confirm, read_images, recurrence
from pipelines.audit.drift import drift_since
from pipelines.audit.findings import Check
from pipelines.audit.regions import MAX_OTHER_MAPS, find_candidate

logger = logging.getLogger(__name__)

EVIDENCE_JSON = "evidence.json"
EVIDENCE_ARRAYS = "evidence.npz"


def _config(manifest: dict):
    """The run's configuration, parsed again from the manifest."""
    from pipelines.run.config import validate

    raw = {key: value for key, value in (manifest.get("config") or {}).items() if value is not None}
    return validate(raw)


class _Model:
    """The run's model and decoding, loaded on first use (only a shortcut candidate needs them)."""

    def __init__(self, manifest: dict, model=None):
        self.manifest = manifest
        self._model = model
        self._probabilities = None
        self._decode = None

    @property
    def probabilities(self):
        if self._probabilities is None:
            config = _config(self.manifest)
            if self._model is None:
                from transforms.support.models import load_model

                self._model = load_model(config.model, config.weights, safe_mode=not config.unsafe_model_loading)
            self._probabilities = Probabilities(self._model)
        return self._probabilities

    @property
    def decode_settings(self):
        if self._decode is None:
            from transforms.decode.decode import DecodeSettings

            model = self.manifest.get("model") or {}
            shape = model.get("input_shape")
            self._decode = DecodeSettings.from_config(_config(self.manifest), tuple(shape[:2]), int(shape[2]),
                                                      model.get("classes"))
        return self._decode


def _region_check(target: int, candidate, grid, samples: dict, class_count: int, model: _Model,
                  rules: dict, seed: int, budget: int) -> tuple[Check, dict]:
    """The ``shortcut_region`` check of one class, and its evidence."""
    class_samples = samples[target]
    region = grid.box_in_pixels(*candidate.cells)
    members = [class_samples[index] for index in candidate.members]
    keys_total = int(round(candidate.member_share * class_count))
    measure, threshold = candidate.member_share, audit_rules.threshold(rules, "shortcut_region")
    margin = rules["shortcut_region"]["margin"]
    evidence = {"class": target, "region": region, "cells": list(candidate.cells), "source": candidate.source,
                "excess": candidate.excess, "member_share": measure, "member_threshold": candidate.threshold,
                "members_in_sample": len(members), "sample_size": len(class_samples), "counterfactual": None}
    where = f"region [y0, x0, y1, x1] = {region} (input pixels)"
    if threshold is None or measure < threshold:
        return Check("shortcut_region", "pass", target=target, region=region, measure=measure, threshold=threshold,
                     keys=[member.key for member in members], keys_total=keys_total,
                     summary=(f"Class {target}: no region carries its saliency beyond other classes' maps "
                              f"(at most {measure:.0%} of its maps, at {where}).")), evidence
    tested = [member for member in members if member.target_rank == 0][:budget]
    others = [sample for other, entries in samples.items() if other != target for sample in entries
              if sample.target_rank == 0 and sample.predicted != target]
    others = [others[index] for index in np.random.default_rng(seed).permutation(len(others))[:budget]]
    images = read_images(tested + others, model.decode_settings) if tested else {}
    member_images = np.array([images[sample.key] for sample in tested if sample.key in images], np.float32)
    other_images = np.array([images[sample.key] for sample in others if sample.key in images], np.float32)
    if len(member_images):
        other_images = other_images.reshape((-1,) + member_images.shape[1:])
        outcome = confirm(target, region, member_images, other_images, model.probabilities, seed=seed,
                          margin=margin)
        pattern = recurrence(member_images, other_images, region)
        evidence["recurring"] = {"pixels": pattern.pixels, "area": pattern.area, "members": pattern.members,
                                 "recurring": pattern.recurring}
    else:
        outcome = pattern = None
    evidence["counterfactual"] = None if outcome is None else {
        "drop": outcome.drop, "drop_control": outcome.drop_control, "flip": outcome.flip,
        "flip_control": outcome.flip_control, "members_tested": outcome.members_tested,
        "others_tested": outcome.others_tested, "margin": margin,
        "confirmed": outcome.confirmed}
    share = f"{measure:.0%} of class {target}'s maps (about {keys_total} records) put their saliency on {where}"
    if outcome is None or outcome.confirmed is None:
        return Check("shortcut_region", "warn", target=target, region=region, measure=measure, threshold=threshold,
                     keys=[member.key for member in members], keys_total=keys_total,
                     summary=(f"{share}, which other classes' maps ignore; its records could not be read again to "
                              "test it: look at the keys' images for a mark or artefact there.")), evidence
    figures = (f"removing it drops the class probability by {outcome.drop:.2f} (control {outcome.drop_control:.2f})"
               + (f", pasting it flips {outcome.flip:.0%} of other images into the class (control "
                  f"{outcome.flip_control:.0%})" if outcome.flip is not None else ""))
    same = (f"the members carry the same content at {pattern.pixels} of its {pattern.area} pixels"
            if pattern.recurring is not None else "")
    if outcome.confirmed and pattern.recurring:
        summary = (f"Shortcut: {share}, which other classes' maps ignore; {figures}; {same} (a recurring mark). "
                   "Find what the images carry there (a tag, watermark, ruler, border), then remove or randomise it "
                   "in the training data, or mask it, and retrain.")
        fail_from = rules["shortcut_region"]["fail"]
        status = "fail" if fail_from is not None and measure >= fail_from else "warn"
    elif outcome.confirmed and pattern.recurring is None:
        summary = (f"{share}, which other classes' maps ignore; {figures}; too few members "
                   f"({pattern.members}) to tell a recurring mark from the class's objects: look at the keys' images "
                   "there.")
        status = "warn"
    elif outcome.confirmed:
        summary = (f"{share}; {figures}, but its content varies from image to image (no recurring mark: "
                   f"{same.replace('carry the same content', 'agree')}): the class's objects sit there. No action.")
        status = "pass"
    else:
        summary = (f"{share}, but it is not a mark the model follows: {figures}, within {margin} of the "
                   "controls" + (" when pasted (removing it takes away the class's own evidence there)"
                                 if outcome.flip is not None else "") +
                   ". Likely the object's usual place; no action.")
        status = "pass"
    confirmed = bool(outcome.confirmed and pattern.recurring is not False)  # a varying region is not a mark
    return Check("shortcut_region", status, target=target, region=region, measure=measure, threshold=threshold,
                 confirmed=confirmed, keys=[member.key for member in members], keys_total=keys_total,
                 summary=summary), evidence


def region_checks(run_dir: str, manifest: dict, rules: dict, model: _Model) -> tuple[list[Check], dict, dict]:
    """Strategy clusters and shortcut regions of every class, from the pipeline's ``_audit/`` files."""
    from transforms.audit.read import read_class_saliency, read_grid, read_samples

    seed = int((manifest.get("config") or {}).get("seed") or 0)
    budget = int((manifest.get("config") or {}).get("counterfactual_samples") or 64)
    grid = read_grid(manifest)
    aggregates = {(entry.target, entry.group): entry for entry in read_class_saliency(run_dir)}
    samples = read_samples(run_dir)
    classes = sorted(target for target, group in aggregates if group == "all")
    checks, evidence, arrays = [], {"grid": {"cells": list(grid.cells), "cell": grid.cell,
                                             "input_shape": list(grid.input_shape)}, "classes": {}}, {}
    rng = np.random.default_rng(seed)
    for target in classes:
        entry = aggregates[(target, "all")]
        arrays[f"class_{target}_mean"] = entry.mean
        for group in ("correct", "wrong"):
            if (target, group) in aggregates:
                arrays[f"class_{target}_{group}_mean"] = aggregates[(target, group)].mean
        class_samples = samples.get(target, [])
        maps = np.array([sample.pooled for sample in class_samples], np.float64).reshape((-1,) + entry.mean.shape)
        keys = [sample.key for sample in class_samples]
        clusters = strategy_clusters(maps, keys, seed=seed)
        for index, cluster in enumerate(clusters.clusters):
            arrays[f"class_{target}_cluster_{index}_mean"] = cluster.mean
        evidence["classes"][str(target)] = {
            "count": entry.count, "sample_size": len(class_samples), "clusters": [
                {"size": cluster.size, "share": cluster.share, "exemplars": cluster.exemplars}
                for cluster in clusters.clusters],
            "eigengap": clusters.eigengap, "eigenvalues": clusters.eigenvalues}
        sizes = ", ".join(f"{cluster.share:.0%}" for cluster in clusters.clusters)
        checks.append(Check(
            "strategy_clusters", "pass", target=target, measure=float(clusters.count),
            keys=[key for cluster in clusters.clusters for key in cluster.exemplars],
            keys_total=sum(len(cluster.exemplars) for cluster in clusters.clusters),
            summary=(f"Class {target}: {clusters.count} strateg{'y' if clusters.count == 1 else 'ies'} among "
                     f"{len(class_samples)} sampled maps" + (f" (shares {sizes}, eigengap {clusters.eigengap:.3f}); "
                                                            "the report shows each cluster's mean map and exemplars."
                                                            if clusters.count > 1 else "."))))
        others = [other for other in classes if other != target]
        if not others or not len(maps):
            checks.append(Check("shortcut_region", "pass", target=target,
                                summary=f"Class {target}: not measured (no other class to compare with)."))
            continue
        weights = np.array([aggregates[(other, "all")].count for other in others], np.float64)
        others_mean = np.tensordot(weights / weights.sum(), np.stack([aggregates[(other, "all")].mean
                                                                       for other in others]), axes=1)
        other_maps = np.array([sample.pooled for other in others for sample in samples.get(other, [])], np.float64)
        if len(other_maps) > MAX_OTHER_MAPS:
            other_maps = other_maps[rng.choice(len(other_maps), MAX_OTHER_MAPS, replace=False)]
        cluster_means = [(f"cluster {index}", cluster.share, cluster.mean)
                         for index, cluster in enumerate(clusters.clusters)] if clusters.count > 1 else []
        candidate = find_candidate(target, entry.mean, others_mean, cluster_means, maps,
                                   other_maps.reshape((-1,) + entry.mean.shape))
        check, region_evidence = _region_check(target, candidate, grid, samples, entry.count, model, rules, seed,
                                               budget)
        checks.append(check)
        evidence["classes"][str(target)]["region"] = region_evidence
    return checks, evidence, arrays


def _write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def audit_run(run_dir: str, rules: dict | None = None, model=None, write: bool = True, out: str | None = None,
              compare_with: str | None = None) -> dict:
    """Audits a finished run; returns the ``_FINDINGS.json`` document (and writes it with ``write``).

    Args:
        run_dir: ``OUTPUT/run_id=<RUN_ID>``, local or ``gs://``.
        rules: the audit rules as a mapping of overrides (:func:`pipelines.audit.rules.parse`); None: the
            run's own ``audit_rules``.
        model: the run's Keras model when the caller has it loaded (else loaded from the manifest when needed).
        write: write ``_FINDINGS.json`` and the evidence (into the run folder, or ``out``).
        out: a folder for ``_FINDINGS.json`` and the evidence instead of the run folder.
        compare_with: the previous run of the drift checks (:mod:`pipelines.audit.drift`): a run folder, or
            ``latest``; None: the run config's ``compare_with``, else the run's baseline, else no drift checks.

    Returns:
        The findings document.
    """
    from pipelines.report.run_data import open_run
    from transforms.audit.pooling import AUDIT_DIR

    run = open_run(run_dir)
    rules = audit_rules.parse((run.manifest.get("config") or {}).get("audit_rules") if rules is None else rules)
    checks = corpus_checks(run, rules)
    evidence, arrays = {}, {}
    if run.manifest.get("audit"):
        region, evidence, arrays = region_checks(run.path, run.manifest, rules, _Model(run.manifest, model))
        checks += region
    else:
        made_without = (run.manifest.get("config") or {}).get("audit") is False
        checks.append(Check("shortcut_region", "pass", summary=(
            "Not measured: the run was made with audit: false." if made_without else
            "Not measured: the run has no _audit/ aggregates (made by a version without them).")))
    checks = audit_rules.apply(rules, checks)
    drift, drift_evidence, drift_arrays = drift_since(run, compare_with, rules, checks)
    if drift_evidence:
        evidence["drift"] = drift_evidence
        arrays.update(drift_arrays)
    document = findings.findings(run.run_id, checks + audit_rules.apply(rules, drift))
    if write:
        target = run.path if out is None else out.rstrip("/")
        if evidence:
            evidence["rules"] = rules
            _write_bytes(FileSystems.join(target, AUDIT_DIR, EVIDENCE_JSON), json.dumps(evidence, indent=2).encode())
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            _write_bytes(FileSystems.join(target, AUDIT_DIR, EVIDENCE_ARRAYS), buffer.getvalue())
        findings.write(target, document)
    failing = [check for check in document["checks"] if check["status"] != "pass"]
    logger.info("Audit: %s (%d checks, %d warn, %d fail)%s", document["status"], len(document["checks"]),
                sum(check["status"] == "warn" for check in failing), sum(check["status"] == "fail" for check in failing),
                "".join(f"\n  {check['status'].upper()} {check['check']}"
                        + (f" class {check['class']}" if check["class"] is not None else "") + f": {check['summary']}"
                        for check in failing[:10]))
    return document
