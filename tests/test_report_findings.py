"""The report's findings: a real tiny run with a synthetic audit (``_FINDINGS.json`` and ``_audit/`` evidence).

The audit's files are written here in their documented formats, not by the
pipeline, so the page is tested against the formats alone.
"""

from __future__ import annotations

import io
import json
import os
import re

import jsonschema
import numpy as np
import pytest
from PIL import Image

from pipelines import smoothgrad_audit
from pipelines.audit import findings
from pipelines.report import figures, findings_view, report, run_data
from tests import helpers
from tests.test_report import assert_self_contained, read_page

GRID = {"cells": [8, 8], "cell": 2, "input_shape": [16, 16]}  # each cell covers 2 x 2 input pixels
REGION = [0, 0, 6, 6]
TOP = 3


def _unit(rng, shape=(8, 8)) -> np.ndarray:
    values = rng.random(shape)
    return values / values.sum()


def _write_audit(run_dir: str, run: run_data.Run, shortcut: int, members: list, flagged_border: int,
                 border_keys: list) -> None:
    """A synthetic ``_FINDINGS.json`` (valid against the schema) and evidence in the audit's formats."""
    classes = sorted({int(target) for target in run.values("target")})
    Check = findings.Check
    checks = [Check("shortcut_region", "fail", f"Shortcut: class {shortcut} looks at the corner.", target=shortcut,
                    region=REGION, measure=0.5, threshold=0.2, confirmed=True, keys=members, keys_total=7),
              Check("border_attention", "warn", f"Class {flagged_border}: the border.", target=flagged_border,
                    measure=1.8, threshold=1.5, keys=border_keys),
              Check("error_rate", "pass", "0 of 12 records ended as error rows.", measure=0.0, threshold=0.01),
              Check("unconverged_maps", "pass", "Converged.", measure=0.0, threshold=0.25)]
    checks += [Check("strategy_clusters", "pass", f"Class {target}: one strategy.", target=target, measure=1.0)
               for target in classes]
    document = findings.findings(run.run_id, checks)
    jsonschema.validate(json.loads(json.dumps(document)), findings.FINDINGS_SCHEMA)
    findings.write(run_dir, document)

    rng, arrays, evidence = np.random.default_rng(1), {}, {"grid": GRID, "rules": {}, "classes": {}}
    targets = run.values("target")
    for target in classes:
        arrays[f"class_{target}_mean"] = _unit(rng)
        arrays[f"class_{target}_correct_mean"] = _unit(rng)
        if target != classes[-1]:  # the last class has no wrong map: its panel says so
            arrays[f"class_{target}_wrong_mean"] = _unit(rng)
        evidence["classes"][str(target)] = {"count": int(np.sum(targets == target)), "sample_size": 4,
                                            "clusters": [], "eigengap": 0.0, "eigenvalues": [1.0]}
    arrays[f"class_{shortcut}_cluster_0_mean"] = _unit(rng)
    arrays[f"class_{shortcut}_cluster_1_mean"] = _unit(rng)
    evidence["classes"][str(shortcut)].update(
        clusters=[{"size": 3, "share": 0.75, "exemplars": members[:2]}, {"size": 1, "share": 0.25,
                                                                         "exemplars": members[2:3]}],
        region={"class": shortcut, "region": REGION, "cells": [0, 0, 3, 3], "source": "cluster 1", "excess": 0.31,
                "member_share": 0.5, "member_threshold": 0.04, "members_in_sample": len(members), "sample_size": 4,
                "counterfactual": {"drop": 0.42, "drop_control": 0.05, "flip": 0.6, "flip_control": 0.1,
                                   "members_tested": 3, "others_tested": 5, "margin": 0.2, "confirmed": True}})
    os.makedirs(os.path.join(run_dir, "_audit"), exist_ok=True)
    with open(os.path.join(run_dir, "_audit", "evidence.json"), "w") as handle:
        json.dump(evidence, handle)
    np.savez_compressed(os.path.join(run_dir, "_audit", "evidence.npz"), **arrays)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    folder = tmp_path_factory.mktemp("findings")
    helpers.write_image_dataset(str(folder / "data"), files=2, per_file=6, size=16, classes=3)
    model = helpers.save_tiny_cnn(str(folder), size=16, classes=3)
    smoothgrad_audit.run(["--input", str(folder / "data" / "*.tfrecord"), "--output", str(folder / "out"),
                          "--model", model, "--run_id", "tiny", "--samples", "4", "--batch_size", "4",
                          "--sanity_records", "0", "--target", "topk:2",  # two classes per record
                          "--audit=false"])  # the test writes its own findings and evidence below
    run_dir = str(folder / "out" / "run_id=tiny")
    bare = report.build_report(run_dir, out=str(folder / "bare"), top=TOP)  # before the audit's files exist
    run = run_data.open_run(run_dir)
    keys, targets = run.values("key"), run.values("target").astype(int)
    shortcut = int(np.bincount(targets).argmax())
    members = [str(key) for key in keys[targets == shortcut]][:4]
    other = next(int(target) for target in targets if target != shortcut) if len(set(targets)) > 1 else shortcut
    border_keys = [str(key) for key in keys[targets == other]][:2] + ["part-9.tfrecord:0"]  # the last: no map
    _write_audit(run_dir, run, shortcut, members, other, border_keys)
    index = report.build_report(run_dir, out=str(folder / "page"), top=TOP)
    text, page = read_page(os.path.dirname(index))
    return {"run_dir": run_dir, "run": run, "out": os.path.dirname(index), "text": text, "page": page,
            "shortcut": shortcut, "members": members, "other": other, "border_keys": border_keys,
            "bare": os.path.dirname(bare)}


def _section_ids(text: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', text)


def _png(folder: str, src: str) -> np.ndarray:
    path = os.path.join(folder, src)
    assert os.path.getsize(path) > 0, src
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n", src
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_page_opens_with_the_findings_worst_first(audited):
    text, page = audited["text"], audited["page"]
    assert _section_ids(text)[:2] == ["findings", "summary"]
    assert re.search(r'<nav>\s*<span class="brand">[^<]*</span>\s*<a href="#findings">Findings</a>', text)
    assert 'data-status-badge="fail"' in text.split('id="summary"')[0]  # the overall status
    findings_html = text.split('<section id="summary"')[0]
    fail, warn = findings_html.index('data-check="shortcut_region" data-status="fail"'), \
        findings_html.index('data-check="border_attention" data-status="warn"')
    passing = findings_html.index('id="findings-passing"')
    assert fail < warn < passing
    assert 'data-check="error_rate" data-status="pass"' in findings_html[passing:]
    assert page.counts["findings.fail"] == "1" and page.counts["findings.warn"] == "1"
    tally = dict(re.findall(r'<tr data-check="(\w+)"><th scope="row">\w+</th>(.*?)</tr>', findings_html, re.S))
    columns = {name: re.findall(r">(\d+)<", cells) for name, cells in tally.items()}  # fail, warn, pass
    assert columns["shortcut_region"] == ["1", "0", "0"] and columns["border_attention"] == ["0", "1", "0"]
    assert columns["error_rate"] == ["0", "0", "1"]
    assert_self_contained(text, page, audited["out"])


def test_the_failing_shortcut_shows_its_figures_numbers_and_member_tiles(audited):
    text, page, out = audited["text"], audited["page"], audited["out"]
    article = text.split('id="finding-0"')[1].split("</article>")[0]
    assert f"class {audited['shortcut']}" in article
    assert "0, 0, 6, 6" in article and "0.420 / 0.050" in article and "0.600 / 0.100" in article
    assert re.search(r"data-keys-total>7<", article)
    for src in ("img/finding-0-maps.png", "img/finding-0-counterfactual.png"):
        assert src in article
        pixels = _png(out, src)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    # the members' tiles, in the findings' order, at most --top of them, each the map of the shortcut class
    assert page.tiles["finding-0"] == audited["members"][:TOP]
    for src in re.findall(r'src="(img/finding-0-\d+\.png)"', article):
        _png(out, src)
    # with two classes per record (topk:2), each tile is the key's map of the shortcut class
    assert re.findall(r'data-target="(\d+)"', article) == [str(audited["shortcut"])] * TOP


def test_other_flagged_checks_show_their_keys_tiles_and_keys_without_a_map(audited):
    text, page = audited["text"], audited["page"]
    article = text.split('id="finding-1"')[1].split("</article>")[0]
    assert page.tiles["finding-1"] == audited["border_keys"][:2]
    assert "part-9.tfrecord:0" in article and "Without a map in the corpus" in article


def test_every_class_mean_map_is_shown_correct_beside_wrong(audited):
    text, out = audited["text"], audited["out"]
    classes = sorted({int(target) for target in audited["run"].values("target")})
    section = text.split('<section id="classes"')[1].split("</section>")[0]
    shown = [int(value) for value in re.findall(r'<figure class="class-map" data-class="(\d+)"', section)]
    assert shown == classes
    for target in classes:
        pixels = _png(out, f"img/class-{target}-maps.png")
        assert pixels.shape[1] > 2 * pixels.shape[0]  # three panels side by side: all, correct, wrong
    assert "correctly and wrongly" in section and "data-evidence" not in section


def test_a_run_without_findings_says_it_was_not_audited(audited):
    text, page = read_page(audited["bare"])
    assert _section_ids(text)[0] == "findings"
    findings_html = text.split('<section id="summary"')[0]
    assert "not audited" in findings_html and "finding-0" not in findings_html
    classes = text.split('<section id="classes"')[1].split("</section>")[0]
    assert "no audit evidence" in classes and 'class="class-map"' not in classes
    assert {"summary", "classes", "histograms", "galleries", "errors"} <= page.ids  # the rest as before


def test_many_classes_draw_the_most_frequent_and_say_how_many_more(audited, tmp_path, monkeypatch):
    monkeypatch.setattr(findings_view, "CLASS_MAPS_SHOWN", 4)
    rng = np.random.default_rng(0)
    counts = {target: int(count) for target, count in enumerate([5, 1, 9, 2, 7, 3])}
    evidence = findings_view.Evidence(
        {"grid": GRID, "classes": {str(target): {"count": count} for target, count in counts.items()}},
        {f"class_{target}_mean": _unit(rng) for target in counts})
    site = report.Site(str(tmp_path / "site"))
    shown = findings_view.class_maps(audited["run"], site, evidence)
    assert [entry["class"] for entry in shown["maps"]] == [0, 2, 4, 5]  # the 4 largest, by class
    assert shown["more"] == 2 and shown["total"] == 6
    assert sorted(os.listdir(tmp_path / "site" / "img")) == [f"class-{target}-maps.png" for target in (0, 2, 4, 5)]


def test_flagged_checks_beyond_the_drawn_ones_are_listed_and_damaged_files_are_a_note(audited, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setattr(findings_view, "DETAILED", 1)
    evidence = findings_view.read_evidence(audited["run_dir"])
    assert evidence.note is None and evidence.grid(audited["run"]) == (2, (16, 16))
    section = findings_view.findings_section(audited["run"], report.Site(str(tmp_path / "site")), TOP, evidence)
    assert [view["check"] for view in section["flagged"]] == ["shortcut_region"]
    assert [check["check"] for check in section["listed"]] == ["border_attention"]
    assert not [name for name in os.listdir(tmp_path / "site" / "img") if name.startswith("finding-1")]

    damaged = tmp_path / "run"
    damaged.mkdir()
    (damaged / findings.FINDINGS).write_text(json.dumps({"run_id": "x", "checks": [{"check": "error_rate"}]}))
    document, note = findings_view.read_findings(str(damaged))
    assert document is None and "not a findings document" in note
    (damaged / findings.FINDINGS).write_text(json.dumps({"checks": [{"check": "error_rate", "status": "warn"}]}))
    document, note = findings_view.read_findings(str(damaged))
    assert note is None and document["checks"][0]["keys"] == [] and document["checks"][0]["class"] is None
    (damaged / findings.FINDINGS).write_text("{not json")
    assert "cannot be read" in findings_view.read_findings(str(damaged))[1]
    assert "no audit evidence" in findings_view.read_evidence(str(damaged)).note


def test_a_tile_outlines_the_region_only_when_given_one(tmp_path):
    picture = run_data.Picture(image=np.zeros((16, 16, 3), np.float32))
    green = np.array(Image.new("RGB", (1, 1), figures.REGION).getpixel((0, 0)))

    def green_pixels(box):
        path = figures.tile(str(tmp_path / f"{box}.png"), picture, np.zeros((16, 16), np.float32), (16, 16), box)
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int(np.sum(np.abs(pixels - green).sum(axis=-1) < 30))

    assert green_pixels(None) == 0
    assert green_pixels(REGION) > 50


def test_the_counterfactual_chart_draws_without_a_flip(tmp_path):
    outcome = {"drop": 0.3, "drop_control": 0.1, "flip": None, "flip_control": None, "margin": 0.2,
               "confirmed": False}
    path = figures.counterfactual(str(tmp_path / "cf.png"), outcome)
    assert os.path.getsize(path) > 0 and Image.open(path).size[0] > 100


def test_the_page_opens_in_a_real_browser_with_findings_first(audited, tmp_path):
    from tests import browser

    if not browser.available():
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium and playwright for the report's browser test")
        pytest.skip("chromium or playwright is not installed here")
    shot = str(tmp_path / "findings.png")
    seen = browser.open_page(os.path.join(audited["out"], "index.html"), shot)
    assert seen["requests"] and all(url.startswith("file://") for url in seen["requests"])
    broken = [src for src, loaded, width in seen["images"] if not loaded or width == 0]
    assert not broken, broken
    assert any("finding-0-maps" in src for src, _, _ in seen["images"])
    text = seen["text"]
    assert text.index("Overall:") < text.index("Run summary") < text.index("Per class")
    assert seen["counts"]["findings.fail"] == "1"
    with open(shot, "rb") as handle:
        Image.open(io.BytesIO(handle.read())).verify()
