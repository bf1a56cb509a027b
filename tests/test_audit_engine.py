"""The findings engine's parts on synthetic maps: strategy clusters, candidate regions, counterfactuals, the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.audit import findings
from pipelines.audit.clusters import strategy_clusters
from pipelines.audit.counterfactual import confirm, fill_from_surroundings, paste, random_box
from pipelines.audit.regions import best_box, box_mass, find_candidate

SIDE = 32


def _blob(y, x, sigma):
    rows, columns = np.mgrid[0:SIDE, 0:SIDE]
    blob = np.exp(-((rows - y) ** 2 + (columns - x) ** 2) / (2 * sigma * sigma))
    return blob / blob.sum()


def _maps(count, shortcut_share, rng, corner=(2, 2)):
    """Maps of an object anywhere; a share of them mostly on a small mark at ``corner``."""
    maps, marked = [], []
    for _ in range(count):
        saliency = _blob(rng.uniform(6, 26), rng.uniform(6, 26), 3) + 0.1 * rng.random((SIDE, SIDE)) / SIDE ** 2
        has_mark = rng.random() < shortcut_share
        if has_mark:
            saliency = 0.3 * saliency + 0.7 * _blob(*corner, 1.2)
        maps.append(saliency / saliency.sum())
        marked.append(has_mark)
    return np.array(maps), np.array(marked)


@pytest.fixture(scope="module")
def classes():
    rng = np.random.default_rng(0)
    return {target: _maps(200, 0.5 if target == 1 else 0.0, rng) for target in range(4)}


def test_clusters_separate_a_shortcut_strategy_and_leave_a_continuum_whole(classes):
    keys = [f"k{index}" for index in range(200)]
    maps, marked = classes[1]
    result = strategy_clusters(maps, keys, seed=0)
    assert result.count == 2 and result.eigengap > 0
    shortcut = max(range(2), key=lambda index: marked[result.clusters[index].members].mean())
    members = result.clusters[shortcut].members
    precision, recall = marked[members].mean(), marked[members].sum() / marked.sum()
    assert precision >= 0.9 and recall >= 0.9
    assert result.clusters[shortcut].mean[:5, :5].sum() > 0.5  # its mean map sits on the mark
    clean = strategy_clusters(classes[0][0], keys, seed=0)
    assert clean.count == 1 and clean.clusters[0].size == 200
    # deterministic with the seed
    again = strategy_clusters(maps, keys, seed=0)
    assert np.array_equal(again.labels, result.labels) and again.clusters[0].exemplars == result.clusters[0].exemplars


def test_a_small_sample_is_one_cluster():
    result = strategy_clusters(np.random.default_rng(1).random((5, 8, 8)), list("abcde"))
    assert result.count == 1 and result.clusters[0].size == 5


def test_the_candidate_region_of_the_shortcut_class_covers_the_mark_and_finds_its_maps(classes):
    means = {target: maps.mean(axis=0) for target, (maps, _) in classes.items()}
    found = {}
    for target, (maps, marked) in classes.items():
        others = [other for other in classes if other != target]
        others_mean = np.mean([means[other] for other in others], axis=0)
        other_maps = np.concatenate([classes[other][0] for other in others])
        found[target] = find_candidate(target, means[target], others_mean, [], maps, other_maps)
    shortcut = found[1]
    y0, x0, y1, x1 = shortcut.cells
    assert y0 <= 2 < y1 and x0 <= 2 < x1 and (y1 - y0) * (x1 - x0) <= 64
    marked = classes[1][1]
    members = np.zeros(len(marked), bool)
    members[shortcut.members] = True
    assert (members & marked).sum() / members.sum() >= 0.8 and (members & marked).sum() / marked.sum() >= 0.8
    for target in (0, 2, 3):  # no region carries a clean class's saliency beyond the others'
        assert found[target].member_share < 0.2


def test_best_box_is_the_smallest_box_with_most_of_the_excess():
    focus = np.zeros((16, 16))
    focus[4:6, 10:12] = 0.25
    box, excess = best_box(focus, np.full((16, 16), 1 / 256), max_side=0.5)
    assert box == (4, 10, 6, 12) and excess == pytest.approx(1 - 4 / 256)
    assert box_mass(focus[None], box)[0] == pytest.approx(1.0)


def test_counterfactual_images_change_only_in_the_box():
    rng = np.random.default_rng(2)
    images = rng.random((3, 20, 20, 3)).astype(np.float32)
    box = [2, 3, 6, 8]
    filled = fill_from_surroundings(images, box)
    outside = np.ones((20, 20), bool)
    outside[2:6, 3:8] = False
    assert np.array_equal(filled[:, outside], images[:, outside])
    assert np.allclose(filled[0, 2:6, 3:8], filled[0, 2, 3])  # one colour per image and channel
    pasted = paste(images[:2], images[2:], box, box)
    assert np.array_equal(pasted[:, 2:6, 3:8], np.repeat(images[2:, 2:6, 3:8], 2, axis=0))
    assert np.array_equal(pasted[:, outside], images[:2, outside])
    other = random_box(rng, (20, 20), box)
    assert other[2] - other[0] == 4 and other[3] - other[1] == 5
    assert other[2] <= box[0] or other[0] >= box[2] or other[3] <= box[1] or other[1] >= box[3]


def _model_of_the_mark(images):
    """Class 1 when the top-left 4x4 square is bright, else class 0 (a model with a shortcut)."""
    bright = images[:, :4, :4].mean(axis=(1, 2, 3))
    logits = np.stack([np.zeros(len(images)), 20 * (bright - 0.8)], axis=1)
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_confirm_finds_the_cause_and_not_a_random_place():
    rng = np.random.default_rng(3)
    members = rng.uniform(0, 0.5, (16, 24, 24, 3)).astype(np.float32)
    members[:, :4, :4] = 1.0  # the mark
    others = rng.uniform(0, 0.5, (16, 24, 24, 3)).astype(np.float32)
    outcome = confirm(1, [0, 0, 4, 4], members, others, _model_of_the_mark, seed=0)
    assert outcome.confirmed is True and outcome.drop > 0.9 and outcome.drop_control < 0.05
    assert outcome.flip == 1.0 and outcome.flip_control == 0.0
    elsewhere = confirm(1, [12, 12, 16, 16], members, others, _model_of_the_mark, seed=0)
    assert elsewhere.confirmed is False


def test_findings_validate_against_the_schema_and_put_failures_first():
    import jsonschema

    checks = [findings.Check("error_rate", "pass", "0 of 10 records ended as error rows.", measure=0.0,
                             threshold=0.01, keys_total=0),
              findings.Check("shortcut_region", "fail", "Shortcut ...", target=2, region=[0, 0, 8, 8], measure=0.8,
                             threshold=0.2, confirmed=True, keys=[f"k{index}" for index in range(1500)],
                             keys_total=1500),
              findings.Check("border_attention", "warn", "Class 1 ...", target=1, measure=float("nan"))]
    document = findings.findings("run-1", checks)
    jsonschema.validate(json.loads(json.dumps(document)), findings.FINDINGS_SCHEMA)
    assert document["status"] == "fail"
    assert [check["status"] for check in document["checks"]] == ["fail", "warn", "pass"]
    assert len(document["checks"][0]["keys"]) == findings.MAX_KEYS and document["checks"][0]["keys_total"] == 1500
    assert document["checks"][1]["measure"] is None  # NaN is not JSON
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**document, "status": "ok"}, findings.FINDINGS_SCHEMA)
