"""Each explaining method under SmoothGrad: its cost against ``gradient`` and its quality on the demo's ground truth.

* ``cost``: images/s of ``SmoothGrad(method=...)`` for ``gradient``,
  ``integrated_gradients`` (``ig_steps`` 32, black baseline) and ``gradcam``
  (``auto`` layer), same N, σ, batch and jit, on the demo model (64×64) and
  on ResNet50 (224×224, random weights: the cost does not depend on them).
  One process; methods alternate round by round (A B C A B C ...), so a busy
  machine weighs on all alike; the median over rounds of warm calls, and the
  ratio to ``gradient`` from the same round.
* ``quality``: on the demo's held-out images, with the demo job's settings
  (N 20, σ 0.1 absolute): mass in mask and the pointing game (the corpus
  columns ``mass_in_mask`` and ``pointing_hit``; chance is the object's area
  share) with 95 % bootstrap intervals, and the model-randomisation cascade
  (top layer first; the rank correlation of each stage's maps with the
  trained model's: a method whose maps do not follow the weights fails it).
* ``completeness``: integrated gradients' completeness error per noisy sample
  (|Σ attributions − (f(x̃) − f(b))| / |f(x̃) − f(b)|) at several ``ig_steps``,
  per baseline, on the demo model.

Needs the demo folder (``python -m pipelines.demo --out demo_data``). Example
(from the repository root)::

    python benchmarks/methods.py --data demo_data --parts cost,quality,completeness --out benchmarks/methods.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipelines.demo import demo_model, demo_records  # noqa: E402
from pipelines.demo.quality_figures import MaskScorer  # noqa: E402
from transforms.engine import methods  # noqa: E402
from transforms.engine.device import current_device_kind  # noqa: E402
from transforms.engine.noise import key_seed, sample_seeds, standard_normal  # noqa: E402
from transforms.explain.sanity import randomisation  # noqa: E402
from transforms.smoothgrad import SmoothGrad  # noqa: E402

METHODS = ("gradient", "integrated_gradients", "gradcam")


def _demo(data: str, count: int):
    split = demo_records.load_split(data, "test")
    images = demo_model.preprocess(split["image"][:count].astype(np.float32))
    keys = [identifier.decode() for identifier in split["id"][:count]]
    return keras.models.load_model(os.path.join(data, "model.keras")), images, keys, split["mask"][:count]


def cost(data: str, rounds: int, settings: dict) -> list[dict]:
    """Images/s per method and model, and the ratio to ``gradient`` (median over rounds)."""
    model, images, keys, _ = _demo(data, 16)
    resnet = keras.applications.ResNet50(weights=None)
    cases = [("demo CNN 64×64", model, images[:8], keys[:8], dict(settings, batch_size=4)),
             ("ResNet50 224×224", resnet,
              np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32), ["r0", "r1"],
              dict(settings, samples=4, batch_size=2))]
    rows = []
    for name, net, batch, batch_keys, engine_settings in cases:
        explainers = {method: SmoothGrad(net, method=method, pixel_range=([-1.0] * 3, [1.0] * 3), **engine_settings)
                      for method in METHODS}
        for explainer in explainers.values():
            explainer(batch, batch_keys)  # trace and warm
        rates = {method: [] for method in METHODS}
        for _ in range(rounds):
            for method, explainer in explainers.items():
                started = time.perf_counter()
                explainer(batch, batch_keys)
                rates[method].append(len(batch) / (time.perf_counter() - started))
        for method in METHODS:
            ratios = [gradient / rate for gradient, rate in zip(rates["gradient"], rates[method])]
            rows.append({"model": name, "method": method, "samples": engine_settings["samples"],
                         "batch_size": engine_settings["batch_size"], "images_per_s": round(statistics.median(rates[method]), 3),
                         "cost_vs_gradient": round(statistics.median(ratios), 2),
                         "layer": explainers[method].gradcam_layer})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def quality(data: str, count: int, sanity_count: int, settings: dict) -> list[dict]:
    """Mass in mask, pointing and the randomisation cascade per method, on the demo's test images."""
    model, images, keys, masks = _demo(data, count)
    scorer = MaskScorer.build(masks, bootstrap=1000, seed=0)
    rows = []
    for method in METHODS:
        args = dict(settings, method=method, pixel_range=([-1.0] * 3, [1.0] * 3), batch_size=16)
        maps = SmoothGrad(model, **args)(images, keys).maps
        figures = scorer.figures(maps)
        cascade = randomisation(model, images[:sanity_count], keys[:sanity_count], **args)["cascade"]
        rows.append({"method": method, "images": count, "chance": round(scorer.chance, 4),
                     "mass_in_mask": scorer.interval(figures["mass"]), "pointing": scorer.interval(figures["pointing"]),
                     "cascade": [(stage["down_to"], round(stage["rank_correlation"], 3)) for stage in cascade]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def completeness(data: str, count: int, steps_list: list[int]) -> list[dict]:
    """Integrated gradients' completeness error per noisy sample, by ``ig_steps`` and baseline."""
    model, images, keys, _ = _demo(data, count)
    black, white = methods.pixel_range(demo_model.preprocess, 3)
    seeds = tf.constant([key_seed(0, key) for key in keys], tf.int64)
    noisy = images + 0.1 * standard_normal(sample_seeds(seeds, tf.constant([0], tf.int64)), images.shape[1:]).numpy()
    rows = []
    for baseline in methods.IG_BASELINES:
        row_seeds = tf.constant([[key_seed(0, key), 0] for key in keys], tf.int64)
        baselines = methods.ig_baselines(baseline, tf.constant(images), row_seeds, tf.constant(black),
                                         tf.constant(white)).numpy()
        for steps in steps_list:
            explainer = SmoothGrad(model, samples=1, noise=0.1, method="integrated_gradients", ig_steps=steps,
                                   ig_baseline=baseline, variant="signed", reduce="none", batch_size=8,
                                   pixel_range=(black, white))
            result = explainer(images, keys)
            index = np.arange(count)
            difference = (explainer._score_fn(tf.constant(noisy)).numpy()[index, result.targets]
                          - explainer._score_fn(tf.constant(baselines)).numpy()[index, result.targets])
            error = np.abs(result.maps.reshape(count, -1).sum(axis=1) - difference) / np.abs(difference)
            meaningful = np.abs(difference) >= 0.5  # a relative error of a difference near zero says little
            rows.append({"baseline": baseline, "ig_steps": steps, "images": int(meaningful.sum()),
                         "median_error_pct": round(100 * float(np.median(error[meaningful])), 2),
                         "max_error_pct": round(100 * float(error[meaningful].max()), 2),
                         "within_1pct": round(float((error[meaningful] <= 0.01).mean()), 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="demo_data")
    parser.add_argument("--parts", default="cost,quality,completeness")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=128, help="demo test images for the quality figures")
    parser.add_argument("--sanity_images", type=int, default=16)
    parser.add_argument("--completeness_images", type=int, default=32)
    parser.add_argument("--steps", default="32,128,512", help="ig_steps for the completeness figures")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = dict(samples=20, noise=0.1, noise_mode="absolute", jit="auto", seed=0)
    parts = args.parts.split(",")
    results = {"settings": settings, "device": current_device_kind()}
    if "cost" in parts:
        results["cost"] = cost(args.data, args.rounds, settings)
    if "quality" in parts:
        results["quality"] = quality(args.data, args.images, args.sanity_images, settings)
    if "completeness" in parts:
        results["completeness"] = completeness(args.data, args.completeness_images,
                                               [int(steps) for steps in args.steps.split(",")])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
