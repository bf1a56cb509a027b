"""The compare command: two real tiny runs (samples 20 and 8, A with one more file) → index.html + PNGs."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.report import compare
from pipelines import smoothgrad_audit
from pipelines.report.run_data import Run, open_run
from tests import helpers
from tests.test_report import MASK, assert_self_contained, masked_dataset, read_page
from transforms.engine.statistics import rank_correlation


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    masked_dataset(str(folder / "data"), files=3, per_file=5)
    model = helpers.save_tiny_cnn(str(folder), size=16, classes=3)

    def audit(run_id, pattern, *extra):
        smoothgrad_audit.run(["--input", str(folder / "data" / pattern), "--output", str(folder / "out"),
                              "--model", model, "--run_id", run_id, "--batch_size", "4", "--mask_feature", MASK,
                              *extra])
        return str(folder / "out" / f"run_id={run_id}")

    a = audit("a20", "*.tfrecord", "--samples", "20")
    b = audit("b8", "part-[01].tfrecord", "--samples", "8")
    index = compare.build_comparison(a, b, top=4)
    text, page = read_page(os.path.dirname(index))
    return {"folder": folder, "audit": audit, "a": a, "b": b, "out": os.path.dirname(index), "text": text,
            "page": page}


def test_the_page_has_every_section_and_only_local_images(runs):
    assert runs["out"] == os.path.join(runs["b"], "compare-a20")  # the default
    assert {"settings", "counts", "classes", "keys", "predictions", "maps", "changed"} <= runs["page"].ids
    assert_self_contained(runs["text"], runs["page"], runs["out"])
    assert "img/correlations.png" in runs["page"].images


def test_maps_of_20_and_8_samples_correlate_highly_but_not_perfectly(runs):
    a, b = open_run(runs["a"]), open_run(runs["b"])
    matching = compare.match(a, b)
    values = compare.correlations(a, b, matching.a_rows, matching.b_rows)
    assert len(values) == 10 and np.all((values >= -1) & (values <= 1))
    assert np.median(values) > 0.6 and np.mean(values < 1) >= 0.9
    # chunks of three maps read the same pairs as one chunk
    small = compare.correlations(a, b, matching.a_rows, matching.b_rows, budget=3 * 16 * 16 * 4)
    np.testing.assert_array_equal(small, values)
    # and a pair checked by hand, with the maps read straight from the shards
    key, target = a.values("key")[matching.a_rows[0]], int(a.values("target")[matching.a_rows[0]])
    maps = []
    for run_dir in (runs["a"], runs["b"]):
        table = pq.read_table([os.path.join(run_dir, name) for name in os.listdir(run_dir)
                               if name.startswith("saliency-")])
        row = next(i for i, pair in enumerate(zip(table["key"].to_pylist(), table["target"].to_pylist()))
                   if pair == (key, target))
        maps.append(table["saliency"].combine_chunks().to_numpy_ndarray()[row])
    assert values[0] == pytest.approx(rank_correlation(*maps))
    assert runs["page"].counts["pairs"] == "10"


def test_keys_of_one_run_only_and_changed_predictions_are_counted(runs):
    counts = runs["page"].counts
    assert (counts["only_a"], counts["only_b"], counts["unpaired"]) == ("5", "0", "0")
    assert counts["changed_predictions"] == "0"  # the same model
    keys = runs["text"].split('id="keys"')[1].split("</section>")[0]
    assert all(f"part-2.tfrecord:{index}" in keys for index in range(5))
    assert (counts["a:records_read"], counts["b:records_read"]) == ("15", "10")


def test_the_gallery_shows_the_k_pairs_that_changed_most(runs):
    tiles = runs["page"].tiles["changed"]
    assert len(tiles) == 4 and len(set(tiles)) == 4
    assert all(src.startswith("img/pair-") for src in runs["page"].images if src != "img/correlations.png")
    assert "placeholder" not in runs["text"].split("<main>")[1]


def test_settings_that_differ_are_highlighted(runs):
    rows = {attrs["data-setting"]: attrs.get("class") for tag, attrs in runs["page"].attributes
            if tag == "tr" and "data-setting" in attrs}
    assert rows["smoothgrad.samples"] == "differs"
    assert rows["model.sha256"] is None and rows["smoothgrad.noise"] is None


def test_maps_of_different_sizes_are_not_correlated(runs, tmp_path):
    small = runs["audit"]("c-down2", "part-0.tfrecord", "--samples", "2", "--downsample", "2")
    index = compare.build_comparison(runs["a"], small, out=str(tmp_path / "page"))
    text, page = read_page(os.path.dirname(index))
    assert "cannot be correlated" in text and 'data-skipped="true"' in text
    assert "img/correlations.png" not in page.images and page.tiles["changed"] == []
    assert page.counts["only_a"] == "10" and page.counts["pairs"] == "5"


def test_rows_pair_on_key_and_target():
    def run(rows):
        table = pa.table({"key": [row[0] for row in rows], "target": [row[1] for row in rows],
                          "predicted": [row[2] for row in rows], "label": [None] * len(rows)})
        return Run(path="x", manifest={}, shards=[], error_files=[], table=table, map_shape=(2, 2))

    a = run([("r1", 0, 0), ("r1", 2, 0), ("r2", 1, 1), ("r3", 0, 0)])  # topk:2 for r1
    b = run([("r1", 2, 2), ("r1", 0, 2), ("r2", 2, 2), ("r4", 1, 1)])
    matching = compare.match(a, b)
    assert sorted(zip(matching.a_rows.tolist(), matching.b_rows.tolist())) == [(0, 1), (1, 0)]
    assert (matching.only_a, matching.only_b, matching.unpaired) == (["r3"], ["r4"], ["r2"])
    assert matching.changed == [{"key": "r1", "label": None, "a": 0, "b": 2},
                                {"key": "r2", "label": None, "a": 1, "b": 2}]


def test_the_command_line_reports_mistakes_in_one_line(runs, tmp_path, capsys):
    for argv, message in (([runs["a"], str(tmp_path / "nowhere")], "does not exist"),
                          ([runs["a"]], "the following arguments are required: RUN_B"),
                          ([runs["a"], runs["b"], "--top", "-1"], "--top must be at least 1")):
        assert compare.main(argv) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("smoothgrad-audit compare: error: ") and message in error
    assert compare.main([runs["a"], runs["b"], "--out", str(tmp_path / "cli"), "--top", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli" / "index.html")
