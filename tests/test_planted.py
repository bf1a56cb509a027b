"""Tests of the planted-shortcut datasets (pipelines/demo/planted*.py): marks, twins, ground truth, models."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import keras

from pipelines.demo import planted, planted_marks, planted_models, planted_tasks
from pipelines.demo.demo_records import example_rng
from pipelines.run.config import Config
from transforms.decode.decode import DecodeSettings, Example, decode_batch
from transforms.read.records import Record

TINY = planted.PlantedSpec(task="shapes", classes=3, image_size=32, train=24, test=16, mark="patch",
                           place="bottom-left", shortcut_class=1, share=0.8, architecture="cnn_max", epochs=1, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("planted"))
    return {"out": out, "results": planted.make_planted(TINY, out)}


def _records(folder: str, split: str = "test") -> list[bytes]:
    files = sorted(glob.glob(os.path.join(folder, f"{split}-*-of-*.tfrecord")))
    return [record.numpy() for record in tf.data.TFRecordDataset(files)]


def _parse(record: bytes) -> dict:
    parsed = tf.io.parse_single_example(record, {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/id": tf.io.FixedLenFeature([], tf.string),
        "image/shortcut": tf.io.FixedLenFeature([], tf.int64),
        "image/object_mask": tf.io.FixedLenFeature([], tf.string),
    })
    return {"image": tf.io.decode_png(parsed["image/encoded"], channels=3).numpy(),
            "mask": tf.io.decode_png(parsed["image/object_mask"]).numpy()[..., 0] > 127,
            "label": int(parsed["image/class/label"]), "id": parsed["image/id"].numpy().decode(),
            "shortcut": int(parsed["image/shortcut"])}


@pytest.mark.parametrize("kind", planted_marks.MARK_KINDS)
def test_a_mark_changes_only_its_box_and_is_the_same_every_time(kind):
    image = np.random.default_rng(0).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    box = planted_marks.mark_box((5, 20), 40, 7)
    marked = planted_marks.apply_mark(image, kind, box)

    assert box == (5, 20, 12, 27)
    changed = (marked != image).any(axis=-1)
    inside = np.zeros((40, 40), bool)
    inside[5:12, 20:27] = True
    assert changed.any() and not changed[~inside].any()
    np.testing.assert_array_equal(marked, planted_marks.apply_mark(image, kind, box))
    batch = planted_marks.apply_mark(np.stack([image, image]), kind, box)
    np.testing.assert_array_equal(batch[1], marked)
    pixels, alpha = planted_marks.draw_mark(kind, 7)
    np.testing.assert_array_equal(marked[5:12, 20:27][alpha], pixels[alpha])


def test_mark_boxes_at_the_corners_and_bad_places():
    assert planted_marks.mark_box("top-left", 64, 8) == (2, 2, 10, 10)
    assert planted_marks.mark_box("top-right", 64, 8) == (2, 54, 10, 62)
    assert planted_marks.mark_box("bottom-left", 32, 5) == (25, 2, 30, 7)
    assert planted_marks.parse_place("12,30") == (12, 30) and planted_marks.parse_place("centre") == "centre"
    with pytest.raises(ValueError, match="does not fit"):
        planted_marks.mark_box((60, 0), 64, 8)
    with pytest.raises(ValueError, match="'place' must be one of"):
        planted_marks.mark_box("middle", 64, 8)
    with pytest.raises(ValueError, match="'kind' must be one of"):
        planted_marks.draw_mark("logo", 8)
    assert planted_marks.box_iou((0, 0, 4, 4), (2, 2, 6, 6)) == pytest.approx(4 / 28)


@pytest.mark.parametrize("task", planted_tasks.TASKS)
@pytest.mark.parametrize("classes", [2, 8])
def test_drawing_is_deterministic_keeps_the_object_off_the_box_and_uses_every_class(task, classes):
    plant = planted_tasks.Plant("ring", planted_marks.mark_box("top-right", 48, 6), shortcut_class=0, share=1.0)
    drawn = [planted_tasks.draw_planted(example_rng(0, "train", index), task, 48, classes, plant) for index in range(60)]
    again = planted_tasks.draw_planted(example_rng(0, "train", 7), task, 48, classes, plant)

    np.testing.assert_array_equal(again.image, drawn[7].image)
    assert sorted({example.label for example in drawn}) == list(range(classes))
    y0, x0, y1, x1 = plant.box
    for example in drawn:
        assert example.carries == (example.label == 0)
        assert not example.mask[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1].any()
        outside = np.ones((48, 48), bool)
        outside[y0:y1, x0:x1] = False
        np.testing.assert_array_equal(example.image[outside], example.clean[outside])
        assert (example.image != example.clean).any() == example.carries


def test_the_same_seed_writes_the_same_records_and_another_seed_others(tiny, tmp_path):
    other = dataclasses.replace(TINY, seed=4)
    data = planted.draw_split(TINY, "test", TINY.test)
    planted.write_split(str(tmp_path / "again"), "test", data, "planted")
    planted.write_split(str(tmp_path / "other"), "test", planted.draw_split(other, "test", TINY.test), "planted")

    first = _records(os.path.join(tiny["out"], "planted"))
    assert first == _records(str(tmp_path / "again"))
    assert first != _records(str(tmp_path / "other"))


def test_the_twin_differs_from_the_planted_set_only_in_the_box_of_the_marked_records(tiny):
    planted_records = [_parse(record) for record in _records(os.path.join(tiny["out"], "planted"))]
    clean_records = [_parse(record) for record in _records(os.path.join(tiny["out"], "clean"))]
    y0, x0, y1, x1 = tiny["results"]["planted"]["box"]
    outside = np.ones((32, 32), bool)
    outside[y0:y1, x0:x1] = False

    assert len(planted_records) == len(clean_records) == TINY.test
    for marked, clean in zip(planted_records, clean_records):
        assert (marked["id"], marked["label"]) == (clean["id"], clean["label"])
        np.testing.assert_array_equal(marked["mask"], clean["mask"])
        np.testing.assert_array_equal(marked["image"][outside], clean["image"][outside])
        assert (marked["image"] != clean["image"]).any() == bool(marked["shortcut"])
        assert clean["shortcut"] == 0
    assert any(record["shortcut"] for record in planted_records)


def test_the_ground_truth_names_the_box_and_exactly_the_marked_keys(tiny):
    truth = tiny["results"]["planted"]
    with open(os.path.join(tiny["out"], "planted", "ground_truth.json"), encoding="utf-8") as handle:
        assert json.load(handle) == {key: value for key, value in truth.items() if key != "regenerated"}
    records = [_parse(record) for record in _records(os.path.join(tiny["out"], "planted"))]

    assert truth["box"] == [25, 2, 30, 7] == list(planted_marks.mark_box("bottom-left", 32, 5))
    assert (truth["shortcut_class"], truth["mark_kind"], truth["task"], truth["architecture"], truth["seed"]) == \
        (1, "patch", "shapes", "cnn_max", 3)
    assert truth["planted_keys"] == [record["id"] for record in records if record["shortcut"]]
    assert all(record["label"] == 1 for record in records if record["shortcut"])  # other_share is 0
    shortcut_class = [record for record in records if record["label"] == 1]
    assert 0 < len(truth["planted_keys"]) <= len(shortcut_class)
    assert truth["planted_count"]["test"] == len(truth["planted_keys"])
    assert 0.0 <= truth["test_accuracy"] <= 1.0
    for section in ("remove", "paste"):
        assert truth["reliance"][section]["images"] > 0
    clean = tiny["results"]["clean"]
    assert clean["planted_keys"] == [] and clean["mark_keys_in_planted"] == truth["planted_keys"]
    assert clean["reliance"]["remove"]["images"] == truth["reliance"]["remove"]["images"]


def test_other_share_marks_the_other_classes_too():
    spec = dataclasses.replace(TINY, share=0.0, other_share=1.0)
    data = planted.draw_split(spec, "test", 30)
    np.testing.assert_array_equal(data["carries"], data["label"] != spec.shortcut_class)


def test_the_records_decode_with_the_pipelines_decoder(tiny):
    records = [Record("test.tfrecord", index, data)
               for index, data in enumerate(_records(os.path.join(tiny["out"], "planted")))]
    settings = DecodeSettings.from_config(Config(id_feature="image/id", mask_feature="image/object_mask",
                                                 preprocess="tf"), image_size=(32, 32), channels=3, num_classes=3)
    decoded = decode_batch(records, settings)

    assert all(isinstance(example, Example) for example in decoded), decoded
    parsed = [_parse(record.data) for record in records]
    assert [example.key for example in decoded] == [record["id"] for record in parsed]
    assert [example.label for example in decoded] == [record["label"] for record in parsed]
    np.testing.assert_allclose(decoded[0].image, parsed[0]["image"] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(decoded[0].mask, parsed[0]["mask"])


def test_a_complete_folder_is_reused_and_a_changed_spec_remade(tiny):
    again = planted.make_planted(TINY, tiny["out"])
    assert [again[twin]["regenerated"] for twin in planted.TWINS] == [False, False]
    with pytest.raises(ValueError, match="'shortcut_class' must be a class"):
        dataclasses.replace(TINY, shortcut_class=3)
    with pytest.raises(ValueError, match="does not fit"):
        dataclasses.replace(TINY, place=(30, 30))


def test_the_saved_model_loads_in_safe_mode_and_predicts_every_class(tiny):
    model = keras.saving.load_model(os.path.join(tiny["out"], "planted", "model.keras"), safe_mode=True)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 3)
    assert model.layers[-1].name == "predictions"


@pytest.mark.parametrize("architecture", planted_models.ARCHITECTURES)
def test_every_architecture_is_safe_mode_loadable_softmax_without_lambda(architecture, tmp_path):
    model = planted_models.build_planted_model(architecture, 32, 5)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    probabilities = planted_models.predict_probabilities(model, images)

    assert model.output_shape == (None, 5) and model.layers[-1].name == "predictions"
    assert keras.activations.serialize(model.layers[-1].activation) == "softmax"
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(planted_models.predict_probabilities(loaded, images), probabilities, rtol=1e-5,
                               atol=1e-6)


class _MarkReader:
    """A stand-in model: class 1 when the box's first pixel is the patch colour (or always ``fixed``)."""

    output_shape = (None, 3)

    def __init__(self, box, fixed=None):
        self.box, self.fixed = box, fixed

    def predict(self, inputs, batch_size=None, verbose=0):
        patch = np.asarray(planted_marks.PATCH_COLOUR, np.float32) / 127.5 - 1.0
        seen = np.all(np.isclose(inputs[:, self.box[0], self.box[1]], patch), axis=-1)
        chosen = np.where(seen, 1, 0) if self.fixed is None else np.full(len(inputs), self.fixed)
        return np.eye(3, dtype=np.float32)[chosen]


def test_reliance_is_strong_for_a_model_reading_the_mark_and_none_for_one_ignoring_it():
    spec = dataclasses.replace(TINY, share=1.0)
    data = planted.draw_split(spec, "test", 40)
    plant = spec.plant()

    reading = planted_models.measure_reliance(_MarkReader(plant.box), data["clean"], data["label"], data["carries"],
                                              plant)
    assert reading["paste"]["flipped_share"] == 1.0 and reading["verdict"] == "strong" and reading["relies_on_mark"]
    assert reading["remove"]["accuracy_with_mark"] == 1.0 and reading["remove"]["accuracy_without_mark"] == 0.0
    assert reading["accuracy_drop"] == 1.0
    ignoring = planted_models.measure_reliance(_MarkReader(plant.box, fixed=2), data["clean"], data["label"],
                                               data["carries"], plant)
    assert ignoring["paste"]["flipped_share"] == 0.0 and ignoring["verdict"] == "none"
    assert ignoring["accuracy_drop"] == 0.0


def test_the_command_line_makes_a_twin_and_rejects_a_bad_place(tmp_path, capsys):
    results = planted.main(["--out", str(tmp_path / "cli"), "--task", "gratings", "--classes", "2",
                            "--image-size", "32", "--train", "8", "--test", "6", "--mark", "barcode",
                            "--place", "3,20", "--architecture", "strided_gap", "--epochs", "1",
                            "--twins", "planted"])
    assert list(results) == ["planted"] and results["planted"]["box"] == [3, 20, 8, 25]
    assert sorted(os.listdir(tmp_path / "cli")) == ["planted"]
    assert "planted: box [3, 20, 8, 25]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        planted.main(["--out", str(tmp_path / "bad"), "--place", "nowhere"])
    assert stopped.value.code == 2


def test_the_benchmark_scores_findings_by_the_findings_contract():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "planted.py")
    spec = importlib.util.spec_from_file_location("planted_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    truth = {"box": [2, 2, 10, 10], "shortcut_class": 1, "planted_keys": ["a", "b", "c", "d"]}

    def check(status, klass, region, keys, name="shortcut_region"):
        return {"check": name, "status": status, "class": klass, "region": region, "measure": 0.3,
                "threshold": 0.1, "confirmed": True, "keys": keys, "keys_total": len(keys), "summary": ""}

    findings = {"run_id": "x", "status": "fail", "checks": [
        check("pass", 1, [2, 2, 10, 10], ["a"]),                  # a pass is no alert
        check("warn", 1, [40, 40, 48, 48], ["e"]),                # far from the box
        check("fail", 1, [0, 0, 8, 8], ["a", "b", "c", "x"]),     # the best: IoU 36 / 92
        check("warn", 2, [0, 0, 8, 8], ["y"]),                    # another class
        check("fail", 1, None, ["a"], name="label_noise")]}       # not a region finding
    scored = benchmark.score_findings(findings, truth)

    assert scored["found"] is True and scored["status"] == "fail" and scored["region"] == [0, 0, 8, 8]
    assert scored["iou"] == pytest.approx(round(36 / 92, 3))
    assert (scored["region_in_box"], scored["box_in_region"]) == (round(36 / 64, 3), round(36 / 64, 3))
    assert (scored["precision"], scored["recall"]) == (0.75, 0.75)
    assert scored["other_class_alerts"] == 1 and scored["confirmed"] is True
    assert benchmark.score_findings({"status": "pass", "checks": []}, truth) == \
        {"run_status": "pass", "found": False, "other_class_alerts": 0}
    assert benchmark.clean_alarms(findings) == [{"class": 1, "region": [40, 40, 48, 48], "status": "warn"},
                                                {"class": 1, "region": [0, 0, 8, 8], "status": "fail"},
                                                {"class": 2, "region": [0, 0, 8, 8], "status": "warn"}]
    assert "| variant |" in benchmark.table([{"variant": "v", "found": True, "iou": 0.5}])


@pytest.mark.parametrize("task", planted_tasks.TASKS)
def test_object_contrast_blends_the_object_only_and_the_default_draws_as_before(task):
    plant = planted_tasks.Plant("patch", planted_marks.mark_box("top-left", 48, 6), shortcut_class=0, share=1.0)
    full = planted_tasks.draw_planted(example_rng(0, "train", 4), task, 48, 4, plant)
    same = planted_tasks.draw_planted(example_rng(0, "train", 4), task, 48, 4, plant, object_contrast=(1.0, 1.0))
    image, mask, label = planted_tasks.draw_task(task, example_rng(0, "train", 4), 48, 4, keep_out=plant.box)
    np.testing.assert_array_equal(full.clean, image)
    np.testing.assert_array_equal(same.image, full.image)

    faint, faint_mask, faint_label = planted_tasks.draw_task(task, example_rng(0, "train", 4), 48, 4,
                                                             keep_out=plant.box, contrast=0.2)
    assert faint_label == label
    np.testing.assert_array_equal(faint_mask, mask)
    if task == "shapes":  # the gratings add pixel noise after the patch: only the shapes keep the background exact
        np.testing.assert_array_equal(faint[~mask], image[~mask])
    assert not np.array_equal(faint[mask], image[mask])
    # Drawn per image from a range: the stream moves on, so the drawings differ from the full-contrast ones.
    varied = [planted_tasks.draw_planted(example_rng(0, "train", index), task, 48, 4, plant, object_contrast=(0.1, 0.5))
              for index in range(4)]
    assert all(example.carries == (example.label == 0) for example in varied)
    with pytest.raises(ValueError, match="object_contrast"):
        planted.PlantedSpec(object_contrast=(0.8, 0.2))
    assert planted.PlantedSpec(object_contrast=[0.2, 1]).parameters()["object_contrast"] == [0.2, 1.0]
    assert planted._parse_contrast("0.3") == (0.3, 0.3)
