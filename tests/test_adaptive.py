"""``samples: auto``: each image stops when its map has converged, with the map a fixed run of that many samples gives."""

from __future__ import annotations

import glob
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import smoothgrad_audit
from pipelines.run.command_line import parse
from pipelines.run.config import ConfigError
from tests import helpers
from transforms.engine.adaptive import AdaptiveSamples, Partial, estimate, stage_boundaries
from transforms.decode.decode import Example
from transforms.explain.explain import Explained, ExplainSettings
from transforms.explain.explain_stages import ResumeStage
from transforms.engine.smoothgrad import VARIANTS, SmoothGrad
from transforms.engine.statistics import (rank_correlation, stopping_correlation, stopping_reliability,
                                          tie_order)

SIZE = 16
COMMON = dict(batch_size=4, jit="graph", min_samples=4, max_samples=16)


@pytest.fixture(scope="module")
def model():
    return helpers.tiny_cnn(size=SIZE, classes=3)


@pytest.fixture(scope="module")
def images():
    return (helpers.random_images(10, SIZE, 0).astype(np.float32) / 127.5 - 1.0), [f"img-{i}" for i in range(10)]


def _fixed(model, images, keys, samples, adaptive, **extra):
    return SmoothGrad(model, samples=int(samples), chunk=adaptive.chunk, batch_size=4, jit=adaptive.jit_used,
                      variant=adaptive.variant, target=str(adaptive.target), **extra)(images, keys)


def _assert_same_as_fixed(model, pixels, keys, adaptive, result):
    scale = float(np.abs(result.maps).max()) or 1.0
    for samples in sorted(set(result.samples_used.tolist())):
        rows = np.flatnonzero(result.samples_used == samples)
        fixed = _fixed(model, pixels[rows], [keys[row] for row in rows], samples, adaptive)
        np.testing.assert_allclose(result.maps[rows], fixed.maps, rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(result.reliability[rows], fixed.reliability, atol=1e-5)
        np.testing.assert_array_equal(result.targets[rows], fixed.targets)
        np.testing.assert_array_equal(result.predicted[rows], fixed.predicted)
        np.testing.assert_allclose(result.scores[rows], fixed.scores, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_map_is_the_fixed_map_with_its_samples_used(model, images, variant):
    pixels, keys = images
    adaptive = SmoothGrad(model, samples="auto", target_reliability=0.9, variant=variant, **COMMON)
    result = adaptive(pixels, keys)
    assert result.samples_used.dtype == np.int32 and result.samples_used.shape == (10,)
    assert set(result.samples_used.tolist()) <= set(adaptive.adaptive.boundaries)
    _assert_same_as_fixed(model, pixels, keys, adaptive, result)
    if variant == "vargrad":  # on this model and target the vargrad maps need different counts
        assert len(set(result.samples_used.tolist())) > 1, result.samples_used


def test_topk_with_xla_stops_an_image_only_when_every_map_converged(model, images):
    pixels, keys = images
    adaptive = SmoothGrad(model, samples="auto", target_reliability=0.95, target="topk:2",
                          **dict(COMMON, jit="xla"))
    result = adaptive(pixels, keys)
    assert result.maps.shape[:2] == (10, 2) and result.reliability.shape == (10, 2)
    _assert_same_as_fixed(model, pixels, keys, adaptive, result)
    rule = adaptive.adaptive
    for row, samples in enumerate(result.samples_used):
        if samples < rule.max_samples:
            assert np.all(estimate(result.stopping[row]) >= rule.threshold(samples))


def test_an_image_stops_at_the_first_stage_whose_estimate_reaches_the_threshold(model, images):
    pixels, keys = images
    adaptive = SmoothGrad(model, samples="auto", target_reliability=0.97, **COMMON)
    result = adaptive(pixels, keys)
    rule = adaptive.adaptive
    expected = np.full(len(keys), rule.max_samples)
    stopped = np.zeros(len(keys), bool)
    for samples in rule.boundaries:  # the rule applied to one-stage runs of every stage's length
        one_stage = SmoothGrad(model, samples="auto", target_reliability=0.97,
                               **dict(COMMON, min_samples=samples, max_samples=samples))(pixels, keys)
        reached = ~stopped & (estimate(one_stage.stopping) >= rule.threshold(samples))
        expected[reached], stopped = samples, stopped | reached
    np.testing.assert_array_equal(result.samples_used, expected)


def test_two_compiles_serve_every_stage_and_companions_change_nothing(model, images):
    pixels, keys = images
    adaptive = SmoothGrad(model, samples="auto", target_reliability=0.99, **COMMON)
    together = adaptive(pixels, keys)
    assert together.samples_used.max() > COMMON["min_samples"]  # later stages ran
    assert adaptive.compile_count == 2  # the first stage, and one function for every later stage
    alone = [adaptive(pixels[i:i + 1], keys[i:i + 1]) for i in (0, 7)]
    assert adaptive.compile_count == 2
    for row, result in zip((0, 7), alone):
        assert result.samples_used[0] == together.samples_used[row]
        np.testing.assert_allclose(result.maps[0], together.maps[row], rtol=1e-6, atol=1e-9)


def test_fixed_samples_report_their_count_for_every_image(model, images):
    pixels, keys = images
    result = SmoothGrad(model, samples=6, batch_size=4, jit="graph")(pixels, keys)
    np.testing.assert_array_equal(result.samples_used, np.full(10, 6))
    empty = SmoothGrad(model, samples="auto", **COMMON)(pixels[:0], [])
    assert empty.maps.shape == (0, SIZE, SIZE) and empty.samples_used.shape == (0,)


def test_resume_takes_only_unfinished_images_at_one_count(model, images):
    pixels, keys = images
    adaptive = SmoothGrad(model, samples="auto", target_reliability=0.99, **COMMON)
    partials = adaptive.begin(pixels[:2], keys[:2])
    assert all(partial.samples == 4 and not partial.done for partial in partials)
    later = adaptive.resume(pixels[:1], keys[:1], partials[:1])
    with pytest.raises(ValueError, match="one sample count"):
        adaptive.resume(pixels[:2], keys[:2], [later[0], partials[1]])


@pytest.mark.parametrize("settings, message", [
    (dict(samples="often"), "samples.*'auto'"),
    (dict(samples="auto", target_reliability=1.0), "target_reliability.*between 0 and 1"),
    (dict(samples="auto", min_samples=1), "min_samples.*>= 2"),
    (dict(samples="auto", min_samples=8, max_samples=6), "max_samples.*>= 8"),
    (dict(samples="auto", reliability=False), "reliability"),
])
def test_bad_settings_are_one_clear_line(model, settings, message):
    with pytest.raises(ValueError, match=message) as caught:
        SmoothGrad(model, **settings)
    assert "\n" not in str(caught.value)


def test_the_estimate_the_stages_and_the_threshold():
    assert float(estimate(0.9)) == pytest.approx(np.sqrt(1.8 / 1.9))
    assert float(estimate(-0.3)) == 0.0 and np.isnan(estimate(np.nan))
    assert stage_boundaries(8, 64) == (8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64)
    assert stage_boundaries(4, 12) == (4, 8, 12) and stage_boundaries(8, 8) == (8,)
    assert stage_boundaries(10, 45) == (10, 12, 16, 20, 24, 28, 32, 40, 45)
    assert stage_boundaries(8, 160)[-6:] == (64, 80, 96, 112, 128, 160)
    assert len(stage_boundaries(8, 1024)) == 27  # four stages per doubling: a bounded number of steps
    rule = AdaptiveSamples()
    assert rule.threshold(8) > rule.threshold(16) > rule.threshold(64) > rule.target
    # a NaN reliability (a constant half-map) never counts as converged
    assert rule.converged(np.array([[0.999], [np.nan]]), 64).tolist() == [True, False]


class _FailingEngine:
    """Resumes like an engine, but fails on any batch holding the key 'bad'."""

    jit_used = "graph"

    def resume(self, images, keys, partials):
        from transforms.explain.explain import EngineOutput

        if "bad" in keys:
            raise RuntimeError("boom")
        done = [Partial(**{**partial.__dict__, "samples": partial.samples + 4, "done": True}) for partial in partials]
        return EngineOutput(result=None, jit_used="graph", new_compiles=0, partials=done)


def _pending(key: str) -> Explained:
    example = Example(key=key, source_file="f", record_index=0, label=None,
                      image=np.zeros((SIZE, SIZE, 3), np.float32), mask=None)
    partial = Partial(state=(np.zeros(1, np.float32),), samples=4, targets=np.zeros(1, np.int32),
                      target_ranks=np.zeros(1, np.int32), scores=np.zeros(1, np.float32), predicted=0,
                      noise_sigma=0.1, maps=np.zeros((1, SIZE, SIZE), np.float32), reliability=np.zeros(1))
    return Explained(example, jit_used="graph", partial=partial)


def test_a_later_stage_passes_finished_images_on_and_fails_only_the_record_at_fault():
    stage = ResumeStage(ExplainSettings("unused", None, True, {"samples": "auto"}), batch_size=2, stage=1)
    stage._engine = _FailingEngine()
    stage.start_bundle()
    finished = Explained(_pending("done").example, error="decoded badly")
    out = list(stage.process(finished)) + list(stage.process(_pending("a"))) + list(stage.process(_pending("bad")))
    out += [value.value for value in stage.finish_bundle()] + list(stage.process(_pending("b")))
    out += [value.value for value in stage.finish_bundle()]
    by_key = {explained.example.key: explained for explained in out}
    assert sorted(by_key) == ["a", "b", "bad", "done"] and len(out) == 4  # every image leaves exactly once
    assert by_key["done"] is finished
    assert by_key["a"].samples_used == 8 and by_key["a"].partial is None and by_key["a"].error is None
    assert by_key["bad"].error.startswith("SmoothGrad failed: RuntimeError: boom")
    assert by_key["b"].samples_used == 8


def _run(tmp_path, *extra):
    helpers.write_image_dataset(str(tmp_path / "data"), files=2, per_file=5, size=SIZE)
    model_path = helpers.save_tiny_cnn(str(tmp_path), size=SIZE, classes=3)
    argv = ["--input", str(tmp_path / "data" / "*.tfrecord"), "--output", str(tmp_path / "out"),
            "--model", model_path, "--run_id", "auto", "--batch_size", "4", "--jit", "graph", "--dtype", "float32",
            "--samples", "auto", *extra]
    smoothgrad_audit.run(argv)
    run_dir = tmp_path / "out" / "run_id=auto"
    table = pq.read_table(sorted(glob.glob(str(run_dir / "saliency-*.parquet"))))
    return model_path, table, json.loads((run_dir / "_MANIFEST.json").read_text())


def test_the_pipeline_stages_give_the_engine_maps_and_the_manifest_their_distribution(tmp_path):
    import keras

    model_path, table, manifest = _run(tmp_path, "--variant", "vargrad", "--target_reliability", "0.9",
                                       "--min_samples", "4", "--max_samples", "16")
    rows = table.to_pylist()
    assert len(rows) == 10 and manifest["invariant_holds"] and manifest["records_explained"] == 10
    used = np.array([row["samples_used"] for row in rows])
    assert len(set(used.tolist())) > 1
    # the engine on the same pixels (file i holds random_images(5, SIZE, i)), keys "<file>:<index>"
    pixels = {f"part-{i}.tfrecord:{j}": image.astype(np.float32) / 127.5 - 1.0
              for i in range(2) for j, image in enumerate(helpers.random_images(5, SIZE, i))}
    keys = [row["key"] for row in rows]
    engine = SmoothGrad(keras.saving.load_model(model_path), samples="auto", variant="vargrad",
                        target_reliability=0.9, **COMMON)
    expected = engine(np.stack([pixels[key] for key in keys]), keys)
    np.testing.assert_array_equal(used, expected.samples_used)
    stored = np.stack([np.asarray(row["saliency"], np.float32).reshape(SIZE, SIZE) for row in rows])
    np.testing.assert_allclose(stored, expected.maps, rtol=1e-5, atol=1e-6 * float(np.abs(stored).max()))
    figures = manifest["samples_used"]
    values, counts = np.unique(used, return_counts=True)
    assert figures["counts"] == {str(value): int(count) for value, count in zip(values, counts)}
    assert figures["mean"] == pytest.approx(used.mean()) and figures["max"] == used.max()
    assert figures["reached_target_before_max"] == pytest.approx(np.mean(used < 16))
    assert manifest["smoothgrad"]["adaptive"] == {"target_reliability": 0.9, "min_samples": 4, "max_samples": 16,
                                                  "stages": [4, 8, 12, 16]}
    assert manifest["fingerprint"]["target_reliability"] == 0.9


def test_a_fixed_run_records_its_samples_in_the_column_and_the_manifest(tmp_path):
    _, table, manifest = _run(tmp_path, "--samples", "6")  # the later flag wins over --samples auto
    assert set(table.column("samples_used").to_pylist()) == {6}
    assert manifest["samples_used"]["counts"] == {"6": 10}
    assert manifest["smoothgrad"]["adaptive"] is None and "reached_target_before_max" not in manifest["samples_used"]


@pytest.mark.parametrize("flags, message", [
    (["--samples", "sometimes"], "config key 'samples': expected a whole number >= 1, or auto"),
    (["--target_reliability", "1.5"], "config key 'target_reliability': expected a number between 0 and 1"),
    (["--min_samples", "12", "--max_samples", "8"], "config key 'max_samples': expected a whole number >= "
                                                    "min_samples"),
])
def test_bad_adaptive_flags_are_one_line_config_errors(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse(["--input", "x", "--output", str(tmp_path), "--model", "m.keras", *flags])
    assert parse(["--input", "x", "--output", str(tmp_path), "--model", "m", "--samples", "AUTO"])[0].samples == "auto"


def test_an_unreachable_target_stops_every_image_at_max_samples(tmp_path):
    _, table, manifest = _run(tmp_path, "--target_reliability", "0.9999", "--min_samples", "4", "--max_samples", "8")
    assert set(table.column("samples_used").to_pylist()) == {8}
    assert manifest["samples_used"]["reached_target_before_max"] == 0.0 and manifest["invariant_holds"]


def _sparse_samples(rng, samples, size=4096):
    """Noisy gradient magnitudes ``[samples, size]`` of a sparse map, and its converged map.

    Each sample reaches pixel i with probability p_i (most pixels rarely, as
    behind a global max pooling head); where it does, the value is about m_i.
    The converged map is p_i * m_i times a constant.
    """
    reach, magnitude = rng.beta(0.3, 3.0, size), rng.lognormal(0.0, 0.7, size)
    reached = rng.random((samples, size)) < reach
    return reached * magnitude * np.abs(1 + 0.8 * rng.normal(size=(samples, size))), reach * magnitude


def test_the_stopping_estimate_does_not_count_pixels_zero_in_both_halves_as_agreement():
    for seed in range(3):
        rng = np.random.default_rng(seed)
        samples, converged = _sparse_samples(rng, 16)
        even, odd = samples[0::2].mean(0), samples[1::2].mean(0)
        assert np.mean((even == 0) & (odd == 0)) > 0.4  # many pixels no sample reached
        truth = rank_correlation(samples.mean(0), converged)
        with_ties = float(estimate(rank_correlation(even, odd)))
        stopping = float(estimate(stopping_correlation(even, odd)))
        assert with_ties > truth + 0.04  # the shared zeros look like agreement: optimistic
        assert stopping <= truth + 0.01 and abs(stopping - truth) < abs(with_ties - truth) / 2


def test_the_stopping_estimate_equals_the_reliability_without_ties_and_is_fixed():
    rng = np.random.default_rng(1)
    even, odd = rng.normal(size=(2, 32, 32))
    assert stopping_correlation(even, odd) == pytest.approx(rank_correlation(even, odd), abs=1e-12)
    samples, _ = _sparse_samples(rng, 8, size=1024)
    sparse_even, sparse_odd = samples[0::2].mean(0), samples[1::2].mean(0)
    first = stopping_correlation(sparse_even, sparse_odd)
    assert stopping_correlation(sparse_even.copy(), sparse_odd.copy()) == first  # no random state
    batch = stopping_reliability(np.stack([even.ravel()[:1024], sparse_even])[:, None],
                                 np.stack([odd.ravel()[:1024], sparse_odd])[:, None])
    assert batch.shape == (2, 1) and batch[1, 0] == np.float32(first)  # the same alone or in a batch
    assert np.isnan(stopping_correlation(np.zeros(16), rng.normal(size=16)))
    np.testing.assert_array_equal(np.sort(tie_order(100, 3)), np.sort(tie_order(100, 3)))
    assert not np.array_equal(tie_order(100, 0).argsort(), tie_order(100, 1).argsort())


def test_the_report_states_the_estimated_share_of_maps_that_reached_the_target():
    from types import SimpleNamespace

    from pipelines.report.report import summary
    from transforms.write.corpus import samples_distribution

    used = dict(samples_distribution({8: 2, 12: 1, 64: 1}), reached_target_before_max=0.75)
    facts = dict(summary(SimpleNamespace(manifest={"samples_used": used}, run_id="r", path="p"))["run"])
    assert facts["samples: auto"].startswith("23.0 samples per map on average; 75.0 % of maps reached the target")
    fixed = dict(summary(SimpleNamespace(manifest={"samples_used": samples_distribution({20: 4})}, run_id="r",
                                         path="p"))["run"])
    assert "samples: auto" not in fixed
