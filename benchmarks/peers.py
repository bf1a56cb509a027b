"""Throughput of this project's SmoothGrad engine against peer SmoothGrad implementations.

In one process and one run, for each model, each N (samples) and each batch B,
on the same random images (fixed seed, uniform in [-1, 1], the model's input
units) with the same absolute noise σ (0.1 by default), this script times:

* ``engine f32 / bf16 / f16``: ``transforms.smoothgrad.SmoothGrad(model,
  samples=N, noise=σ, batch_size=B, jit="auto", precision=P)``; float32 is the
  baseline of every ratio. A precision the installed engine does not accept
  (no ``precision`` argument) is skipped with a note.
* ``kex loop``: the graph-loop strategy of ``keras_explainable``, written here
  (keras_explainable itself is not installed): one ``tf.function`` (plain
  graph, no XLA) with a ``tf.range`` loop of N steps, each step the input
  gradient of the target logit for one noisy batch of the B images, |g|
  channel-mean added to a running sum.
* ``PAIR saliency`` (``saliency.core.GradientSaliency().GetSmoothedMask``): one
  image at a time and one noisy sample per gradient call, as the library
  works; its fair best: the call_model_function runs a compiled
  ``tf.function`` gradient (batch of 1). Its noise is drawn on the host
  (NumPy); ``stdev_spread = σ / (max − min)`` of each image gives exactly the
  absolute σ.
* ``tf-keras-vis`` (``Saliency(...)(score, X, smooth_samples=N,
  smooth_noise=...)``): eager gradients of one noisy batch of B images per
  sample, noise drawn on the host. ``smooth_noise`` is one relative σ per call,
  so it is set to σ / (mean over the batch of max − min); the absolute σ of each
  image then differs from σ by its range's deviation from the batch mean
  (recorded as ``sigma_abs_range``; < 0.01 % for uniform [-1, 1] images).
* ``xplique`` (``xplique.attributions.SmoothGrad(model, nb_samples=N,
  noise=σ, batch_size=B × engine chunk)``): absolute σ; ``batch_size`` is the
  number of noisy images per gradient call, set to the engine's own (B × its
  chunk) so both hold the same number of noisy images at once.

Every implementation explains the same scores, the pre-softmax logits
(``transforms.engine.scores.score_function``; the peers get a Keras model built from
it), and the same target, the top-1 class of the clean input. The engine and
the kex loop choose it themselves (one clean forward pass per image); the peers
are given it, and the engine's targets are checked to agree.

What each returns: the engine, the kex loop and tf-keras-vis the mean over
samples of the channel-mean |gradient| (the engine's default ``smoothgrad``
variant). PAIR (``magnitude=False``) and xplique return the mean *signed*
gradient (the paper's SmoothGrad), reduced here (PAIR) or by xplique's
``reducer="mean"`` to its channel mean. Fidelity is the Spearman rank
correlation (``transforms.engine.statistics.rank_correlation``, mean over the batch's
images) with the engine's float32 maps of the same quantity: the default
variant for |gradient| implementations, ``variant="signed"`` (one untimed
engine call) for PAIR and xplique. Noise draws differ between implementations,
so expect clearly positive values below 1; a value near 0 means a broken call.
Rows whose maps are constant or whose engine explained another class than the
float32 top-1 are flagged (⚠ in the markdown, ``warnings`` in the JSON): with
random weights MobileNetV2's logits are about 1e-11, below float16's range, so
``precision="float16"`` gives all-zero maps there and its time means nothing.

Measured: wall time of warm calls in this process, numpy images in, numpy maps
out (host noise, conversions and Python loops included, as a user pays them).
The first call of each implementation (tracing and compiling) is timed
separately and excluded; the reported figure is the median of ``--repeats``
further calls over the same B images; images/s = B / median. Not measured: GPUs,
memory, the Beam pipeline, pretrained weights (``weights=None``: random
weights, same cost), other variants, reductions or noise modes.

Command for the full measurement (from the repository root, with
``pip install -e '.[bench]'``, on a quiet machine)::

    python benchmarks/peers.py --models small_cnn,MobileNetV2,ResNet50,Xception \\
        --samples 10,20 --batch 4,8 --repeats 3 --out peers.json --markdown peers.md

A quick check::

    python benchmarks/peers.py --models small_cnn,MobileNetV2 --samples 2 --batch 2 --repeats 1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import inspect
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from transforms.support.errors import one_line  # noqa: E402
from transforms.engine.statistics import rank_correlation  # noqa: E402
from transforms.engine.scores import score_function  # noqa: E402
from transforms.engine.smoothgrad import SmoothGrad  # noqa: E402

#: keras.applications models are built at this size (weights=None).
APPLICATION_SIZE = 224
#: The small CNN of this script is built at this size.
SMALL_CNN_SIZE = 64
PRECISIONS = ("float32", "bfloat16", "float16")
PEERS = ("kex_loop", "pair", "tf_keras_vis", "xplique")

#: Peer libraries: import name, pip distribution name.
PEER_PACKAGES = {"pair": ("saliency.core", "saliency"), "tf_keras_vis": ("tf_keras_vis.saliency", "tf-keras-vis"),
                 "xplique": ("xplique.attributions", "xplique")}
#: Column labels, in table order.
LABELS = {"engine_float32": "engine f32", "engine_bfloat16": "engine bf16", "engine_float16": "engine f16",
          "kex_loop": "kex loop", "pair": "PAIR saliency", "tf_keras_vis": "tf-keras-vis", "xplique": "xplique"}
#: What each implementation's map is (and so which engine map it is compared with).
SIGNED = ("pair", "xplique")


class Skipped(Exception):
    """An implementation that cannot run in this environment (reported, not an error)."""


@dataclasses.dataclass
class Case:
    """One (model, N, batch) setting, shared by every implementation."""

    model: keras.Model          # the model as given (softmax head)
    logits: keras.Model         # the same model up to its pre-softmax scores
    images: np.ndarray          # float32 [B, H, W, C] in [-1, 1]
    targets: np.ndarray         # int32 [B]: top-1 class of the clean logits
    samples: int                # N
    sigma: float                # absolute noise σ, in input units
    seed: int
    engine_chunk: int           # noisy samples per image per gradient step in the engine

    @property
    def batch(self) -> int:
        return int(self.images.shape[0])

    @property
    def keys(self) -> list[str]:
        return [f"img-{index}" for index in range(self.batch)]


# A runner is (run, details): run(images, targets) -> maps float32 [B, H, W];
# details is a dict the runner may fill with what it used.
Runner = tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], dict]


# ------------------------------------------------------------------ models
def small_cnn(image_size: int = SMALL_CNN_SIZE, classes: int = 10) -> keras.Model:
    """Three strided 3×3 convolutions, global average pooling and a softmax head."""
    inputs = keras.Input((image_size, image_size, 3))
    features = inputs
    for filters in (16, 32, 64):
        features = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(features)
    features = keras.layers.GlobalAveragePooling2D()(features)
    outputs = keras.layers.Dense(classes, activation="softmax", name="predictions")(features)
    return keras.Model(inputs, outputs, name="small_cnn")


def build_model(name: str, seed: int) -> keras.Model:
    """``small_cnn`` (64×64) or a keras.applications model at 224×224, random weights."""
    keras.utils.set_random_seed(seed)
    if name == "small_cnn":
        return small_cnn()
    if not hasattr(keras.applications, name):
        raise SystemExit(f"Unknown model {name!r}: use small_cnn or a keras.applications name.")
    return getattr(keras.applications, name)(weights=None, input_shape=(APPLICATION_SIZE, APPLICATION_SIZE, 3))


def logits_model(model: keras.Model) -> tuple[keras.Model, str]:
    """A Keras model of ``model``'s pre-softmax scores (shared weights), and what it scores."""
    scores, note = score_function(model, logits=True)
    inputs = keras.Input(model.input_shape[1:])
    return keras.Model(inputs, scores(inputs), name=f"{model.name}_logits"), note


def random_images(count: int, image_size: int, seed: int) -> np.ndarray:
    """``count`` float32 images uniform in [-1, 1]."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (count, image_size, image_size, 3)).astype(np.float32)


# ------------------------------------------------------------ implementations
def engine_runner(case: Case, precision: str = "float32", variant: str = "smoothgrad") -> Runner:
    """This project's engine; it chooses the top-1 target itself."""
    options = {}
    if precision != "float32":
        if "precision" not in inspect.signature(SmoothGrad).parameters:
            raise Skipped("this SmoothGrad has no 'precision' argument yet")
        options["precision"] = precision
    explainer = SmoothGrad(case.model, samples=case.samples, noise=case.sigma, variant=variant,
                           batch_size=case.batch, jit="auto", seed=case.seed, **options)
    keys = case.keys
    details = {"chunk": explainer.chunk}

    def run(images, targets):
        result = explainer(images, keys)
        details.update(jit=explainer.jit_used, compile_count=explainer.compile_count,
                       targets_match=bool(np.array_equal(result.targets, targets)))
        return result.maps

    return run, details


def kex_loop_runner(case: Case) -> Runner:
    """keras_explainable's strategy: a graph loop of N steps, one noisy batch of B images per step."""
    model, samples, sigma = case.logits, case.samples, case.sigma

    @tf.function(input_signature=[tf.TensorSpec(case.images.shape, tf.float32)], jit_compile=False)
    def smooth(images):
        targets = tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)
        total = tf.zeros(images.shape[:-1], tf.float32)
        for _ in tf.range(samples):
            noisy = images + tf.random.normal(images.shape, stddev=sigma)
            with tf.GradientTape() as tape:
                tape.watch(noisy)
                scores = tf.gather(model(noisy, training=False), targets, batch_dims=1)
            total += tf.reduce_mean(tf.abs(tape.gradient(scores, noisy)), axis=-1)
        return total / samples

    def run(images, targets):
        return smooth(tf.constant(images)).numpy()

    return run, {"jit": "graph"}


def pair_runner(case: Case) -> Runner:
    """PAIR saliency: one image at a time, one sample per (compiled) gradient call."""
    pair = importlib.import_module("saliency.core")
    model = case.logits
    single = tf.TensorSpec((1,) + case.images.shape[1:], tf.float32)

    @tf.function(input_signature=[single, tf.TensorSpec([], tf.int32)])
    def gradient(image, target):
        with tf.GradientTape() as tape:
            tape.watch(image)
            score = model(image, training=False)[0, target]
        return tape.gradient(score, image)

    def call_model_function(x_value_batch, call_model_args=None, expected_keys=None):
        grads = gradient(tf.constant(x_value_batch, tf.float32), call_model_args["target"])
        return {pair.INPUT_OUTPUT_GRADIENTS: grads.numpy()}

    method = pair.GradientSaliency()

    def run(images, targets):
        maps = []
        for image, target in zip(images, targets):
            spread = case.sigma / float(image.max() - image.min())  # PAIR's σ = spread × (max − min)
            mask = method.GetSmoothedMask(image, call_model_function, {"target": int(target)},
                                          stdev_spread=spread, nsamples=case.samples, magnitude=False)
            maps.append(mask.mean(axis=-1))
        return np.stack(maps).astype(np.float32)

    return run, {"noise": "stdev_spread = sigma / (max - min) per image (exact absolute sigma)"}


def tf_keras_vis_runner(case: Case) -> Runner:
    """tf-keras-vis: eager gradients, one noisy batch of B images per sample."""
    saliency_module = importlib.import_module("tf_keras_vis.saliency")
    scores_module = importlib.import_module("tf_keras_vis.utils.scores")
    explainer = saliency_module.Saliency(case.logits, model_modifier=None, clone=False)
    details = {}
    # tf-keras-vis calls the model with a one-element list of inputs; Keras 3 warns on every call.
    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match", category=UserWarning)

    def run(images, targets):
        ranges = images.reshape(len(images), -1).max(axis=1) - images.reshape(len(images), -1).min(axis=1)
        relative = case.sigma / float(ranges.mean())  # one relative σ per call
        sigma_abs = relative * ranges
        details.update(smooth_noise=relative, sigma_abs_range=[float(sigma_abs.min()), float(sigma_abs.max())])
        grads = explainer(scores_module.CategoricalScore(targets.tolist()), images, smooth_samples=case.samples,
                          smooth_noise=relative, keepdims=True, normalize_map=False)
        return np.asarray(grads).mean(axis=-1)  # mean |g| per channel (its default abs modifier) -> channel mean

    return run, details


def xplique_runner(case: Case) -> Runner:
    """xplique: absolute σ, noisy images batched B × engine chunk at a time."""
    attributions = importlib.import_module("xplique.attributions")
    batch_size = case.batch * case.engine_chunk
    explainer = attributions.SmoothGrad(case.logits, nb_samples=case.samples, noise=case.sigma,
                                        batch_size=batch_size)
    classes = int(case.logits.output_shape[-1])

    def run(images, targets):
        maps = explainer.explain(images, tf.one_hot(targets, classes))
        return np.asarray(maps)[..., 0]

    return run, {"batch_size": batch_size}


def runners(precisions: list[str], peers: list[str]) -> dict[str, Callable[[Case], Runner]]:
    """The implementations to time, engine float32 first, in table order."""
    chosen = {f"engine_{precision}": (lambda case, precision=precision: engine_runner(case, precision))
              for precision in PRECISIONS if precision == "float32" or precision in precisions}
    factories = {"kex_loop": kex_loop_runner, "pair": pair_runner, "tf_keras_vis": tf_keras_vis_runner,
                 "xplique": xplique_runner}
    chosen.update({name: factories[name] for name in PEERS if name in peers})
    return chosen


def peer_versions(peers: list[str]) -> dict[str, dict]:
    """Each requested peer library's version, or why it cannot be used here."""
    found = {}
    for name in peers:
        if name not in PEER_PACKAGES:
            continue
        module, distribution = PEER_PACKAGES[name]
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[name] = {"unavailable": f"{distribution} is not installed (pip install -e '.[bench]')"}
            continue
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any import failure is a finding to report
            found[name] = {"version": version, "unavailable": one_line(f"{type(error).__name__}: {error}")}
            continue
        found[name] = {"version": version}
    return found


# ------------------------------------------------------------------ timing
def time_calls(run, images: np.ndarray, targets: np.ndarray, repeats: int) -> tuple[np.ndarray, dict]:
    """The first call (tracing and compiling, excluded) and ``repeats`` timed calls."""
    start = time.perf_counter()
    maps = run(images, targets)
    first_call = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        maps = run(images, targets)
        seconds.append(time.perf_counter() - start)
    maps = np.asarray(maps, np.float32)
    if maps.shape != images.shape[:-1]:
        raise RuntimeError(f"maps of shape {maps.shape}, expected {images.shape[:-1]}")
    if not np.all(np.isfinite(maps)):
        raise RuntimeError("non-finite values in the maps")
    median = statistics.median(seconds)
    return maps, {"first_call_s": first_call, "call_s": seconds, "median_call_s": median,
                  "images_per_s": len(images) / median}


def mean_rank_correlation(maps: np.ndarray, reference: np.ndarray) -> float | None:
    """Spearman rank correlation per image, averaged (None when every map is constant)."""
    values = [rank_correlation(a, b) for a, b in zip(maps, reference)]
    values = [value for value in values if np.isfinite(value)]
    return float(np.mean(values)) if values else None


def map_warnings(maps: np.ndarray, details: dict) -> list[str]:
    """What makes a timing meaningless though the call ran: constant maps, another target."""
    found = []
    constant = [index for index, one in enumerate(maps) if np.ptp(one) == 0]
    if constant:
        values = sorted({float(maps[index].flat[0]) for index in constant})
        found.append(f"{len(constant)}/{len(maps)} maps constant (value {', '.join(f'{v:g}' for v in values)})")
    if details.get("targets_match") is False:
        found.append("explained another class than the float32 top-1")
    return found


def run_case(case: Case, implementations: dict, unavailable: dict, repeats: int) -> list[dict]:
    """Times every implementation on one case; fills ratios and fidelity."""
    rows, maps = [], {}
    base = {"samples": case.samples, "batch": case.batch, "sigma": case.sigma}
    for name, factory in implementations.items():
        row = dict(base, implementation=name)
        rows.append(row)
        if name in unavailable:
            row["skipped"] = unavailable[name]
            continue
        try:
            run, details = factory(case)
            maps[name], timing = time_calls(run, case.images, case.targets, repeats)
            row.update(timing, details=details, warnings=map_warnings(maps[name], details))
        except Skipped as reason:
            row["skipped"] = str(reason)
        except Exception as error:  # noqa: BLE001 - a broken peer is reported, the run goes on
            row["error"] = one_line(f"{type(error).__name__}: {error}")
        gc.collect()
    references = {"smoothgrad": maps.get("engine_float32")}
    if any(name in maps for name in SIGNED):
        try:  # untimed: the engine's map of the same quantity as PAIR's and xplique's
            references["signed"] = engine_runner(case, "float32", "signed")[0](case.images, case.targets)
        except Exception as error:  # noqa: BLE001
            print(f"  (no signed reference: {one_line(error)})")
    baseline = next((row for row in rows if row["implementation"] == "engine_float32"), {})
    for row in rows:
        name = row["implementation"]
        if name not in maps:
            continue
        if baseline.get("images_per_s"):
            row["ratio_to_engine"] = row["images_per_s"] / baseline["images_per_s"]
        kind = "signed" if name in SIGNED else "smoothgrad"
        row["reference"] = f"engine {kind} float32"
        if references.get(kind) is not None and name != "engine_float32":
            row["rank_correlation"] = mean_rank_correlation(maps[name], references[kind])
    return rows


# ----------------------------------------------------------------- reports
def _cell(row: dict) -> str:
    if "images_per_s" in row:
        ratio = row.get("ratio_to_engine")
        text = f"{row['images_per_s']:.3g} ({ratio:.2f}×)" if ratio else f"{row['images_per_s']:.3g}"
        return text + (" ⚠" if row.get("warnings") else "")
    return "error" if "error" in row else "—"


def _correlation_cell(row: dict) -> str:
    value = row.get("rank_correlation")
    return "—" if value is None else f"{value:.2f}"


def print_case(model: str, rows: list[dict]) -> None:
    """One plain-text table of a (model, N, batch) case."""
    first = rows[0]
    print(f"\n{model}  N={first['samples']}  batch={first['batch']}  sigma={first['sigma']}")
    print(f"  {'implementation':15s} {'first call s':>12s} {'median s':>9s} {'images/s':>9s} "
          f"{'x engine':>8s} {'rho':>5s}  note")
    for row in rows:
        label = LABELS[row["implementation"]]
        if "images_per_s" not in row:
            print(f"  {label:15s} {'':>12s} {'':>9s} {'':>9s} {'':>8s} {'':>5s}  "
                  f"{'skipped: ' + row['skipped'] if 'skipped' in row else 'ERROR: ' + row['error']}")
            continue
        details = row.get("details", {})
        note = ", ".join([f"{key}={value}" for key, value in details.items()
                          if key in ("jit", "chunk", "compile_count", "batch_size")]
                         + [f"WARNING: {warning}" for warning in row.get("warnings", [])])
        ratio = row.get("ratio_to_engine")
        print(f"  {label:15s} {row['first_call_s']:12.2f} {row['median_call_s']:9.3f} {row['images_per_s']:9.3g} "
              f"{(f'{ratio:.2f}') if ratio else '':>8s} {_correlation_cell(row):>5s}  {note}")
    sys.stdout.flush()


def markdown(report: dict) -> str:
    """Tables to paste into benchmarks/RESULTS.md: per model, throughput then fidelity."""
    environment, settings = report["environment"], report["settings"]
    names = [name for name in LABELS if any(row["implementation"] == name for row in report["rows"])]
    peers = ", ".join(f"{LABELS[name]} {info.get('version', '')}".strip()
                      + (f" (not run: {info['unavailable']})" if "unavailable" in info else "")
                      for name, info in environment["peers"].items())
    lines = [
        "## Peer SmoothGrad implementations",
        "",
        f"Command (from the repository root), run {report['date']}:",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"Machine: {environment['cpus']} CPUs ({environment['processor']}), {environment['platform']}, "
        f"GPUs: {', '.join(environment['gpus']) or 'none'}; load average at start "
        f"{environment['load_average_at_start']}, at end {report['load_average_at_end']}. "
        f"Python {environment['python']}, TensorFlow {environment['tensorflow']}, Keras {environment['keras']}, "
        f"NumPy {environment['numpy']}; peers: {peers or 'none requested'}.",
        "",
        f"Random weights, random images uniform in [-1, 1] (seed {settings['seed']}), absolute σ = "
        f"{settings['sigma']}, top-1 pre-softmax target, same images for every implementation. Cells: "
        f"images/s = B / median of {settings['repeats']} warm calls over B images (first call excluded), "
        "and (× engine f32) in the same run. kex loop = keras_explainable's graph loop, re-implemented; PAIR = "
        "one image and one sample per compiled gradient call; tf-keras-vis = eager; xplique batch_size = "
        "B × engine chunk. See `benchmarks/peers.py` for how σ and targets were matched.",
    ]
    for model in dict.fromkeys(row["model"] for row in report["rows"]):
        rows = [row for row in report["rows"] if row["model"] == model]
        size = rows[0]["image_size"]
        cases = list(dict.fromkeys((row["samples"], row["batch"]) for row in rows))
        by_key = {(row["samples"], row["batch"], row["implementation"]): row for row in rows}
        header = "| N | batch | " + " | ".join(LABELS[name] for name in names) + " |"
        rule = "|---:|---:|" + "---:|" * len(names)
        lines += ["", f"### {model} ({size}×{size}×3, {rows[0]['scores_from']})", "",
                  "Images/s (× engine f32):", "", header, rule]
        lines += [f"| {n} | {batch} | " + " | ".join(_cell(by_key.get((n, batch, name), {})) for name in names) + " |"
                  for n, batch in cases]
        compared = [name for name in names if name != "engine_float32"]
        if compared:
            lines += ["", "Rank correlation (Spearman, mean over the batch) with the engine's float32 maps "
                      "(PAIR and xplique: with the engine's `signed` variant, their quantity):", "",
                      "| N | batch | " + " | ".join(LABELS[name] for name in compared) + " |",
                      "|---:|---:|" + "---:|" * len(compared)]
            lines += [f"| {n} | {batch} | " + " | ".join(_correlation_cell(by_key.get((n, batch, name), {}))
                                                         for name in compared) + " |" for n, batch in cases]
        problems = [(row, problem) for row in rows
                    for problem in ([f"error: {row['error']}"] if "error" in row else [])
                    + ([f"skipped: {row['skipped']}"] if "skipped" in row else [])
                    + [f"⚠ {warning}" for warning in row.get("warnings", [])]]
        if problems:
            lines.append("")
            lines += [f"- {LABELS[row['implementation']]} (N={row['samples']}, batch={row['batch']}): {problem}"
                      for row, problem in problems]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- main
def _int_list(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value.strip()]


def _name_list(text: str) -> list[str]:
    return [value.strip() for value in text.split(",") if value.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small_cnn,MobileNetV2,ResNet50,Xception",
                        help="comma-separated: small_cnn and/or keras.applications names (default: %(default)s)")
    parser.add_argument("--samples", default="10,20", help="comma-separated N (default: %(default)s)")
    parser.add_argument("--batch", default="4,8", help="comma-separated batch sizes B (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first (default: %(default)s)")
    parser.add_argument("--sigma", type=float, default=0.1,
                        help="absolute noise σ in input units (default: %(default)s)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="engine precisions; float32 always runs (default: %(default)s)")
    parser.add_argument("--peers", default=",".join(PEERS), help="peers to time (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weights, images and noise seed (default: %(default)s)")
    parser.add_argument("--out", default=None, help="optional JSON file for the full results")
    parser.add_argument("--markdown", default=None, help="optional markdown file for benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    for option, values, allowed in (("--precisions", _name_list(args.precisions), PRECISIONS),
                                    ("--peers", _name_list(args.peers), PEERS)):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)}; choose among {', '.join(allowed)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    models, sample_counts, batches = _name_list(args.models), _int_list(args.samples), _int_list(args.batch)
    precisions, peers = _name_list(args.precisions), _name_list(args.peers)
    report = {
        "command": " ".join(["python", "benchmarks/peers.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "gpus": [device.name for device in tf.config.list_logical_devices("GPU")],
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__,
            "engine_accepts_precision": "precision" in inspect.signature(SmoothGrad).parameters,
            "peers": peer_versions(peers), "load_average_at_start": os.getloadavg(),
        },
        "settings": vars(args),
        "rows": [],
    }
    environment = report["environment"]
    unavailable = {name: info["unavailable"] for name, info in environment["peers"].items() if "unavailable" in info}
    print(f"# {report['date']}  Python {environment['python']}  TF {environment['tensorflow']}  "
          f"Keras {environment['keras']}  {environment['cpus']} CPUs  GPUs: {environment['gpus'] or 'none'}")
    for name, info in environment["peers"].items():
        status = f"NOT RUN: {unavailable[name]}" if name in unavailable else ""
        print(f"# {LABELS[name]}: {info.get('version', '')} {status}")
    if not environment["engine_accepts_precision"] and set(precisions) - {"float32"}:
        print("# note: SmoothGrad has no 'precision' argument yet; bfloat16/float16 rows are skipped")
    implementations = runners(precisions, peers)
    # Every implementation and engine instance traces its own function; TensorFlow's
    # "excessive retracing" warning counts them together. Each engine's own trace
    # count is recorded (compile_count).
    tf.get_logger().setLevel(logging.ERROR)

    for model_name in models:
        model = build_model(model_name, args.seed)
        logits, scores_from = logits_model(model)
        image_size = int(model.input_shape[1])
        all_images = random_images(max(batches), image_size, args.seed)
        for batch in batches:
            images = all_images[:batch]
            targets = np.argmax(np.asarray(logits(images, training=False)), axis=-1).astype(np.int32)
            for samples in sample_counts:
                # NumPy's and TF's global generators: the noise of PAIR, tf-keras-vis, xplique, kex loop.
                keras.utils.set_random_seed(args.seed)
                case = Case(model=model, logits=logits, images=images, targets=targets, samples=samples,
                            sigma=args.sigma, seed=args.seed,
                            engine_chunk=SmoothGrad(model, samples=samples, batch_size=batch).chunk)
                rows = run_case(case, implementations, unavailable, args.repeats)
                for row in rows:
                    row.update(model=model_name, image_size=image_size, scores_from=scores_from)
                print_case(model_name, rows)
                report["rows"] += rows
        del model, logits
        keras.backend.clear_session()
        gc.collect()

    report["load_average_at_end"] = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) at start {environment['load_average_at_start']}, "
          f"at end {report['load_average_at_end']}")
    text = markdown(report)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(text)
    return report


if __name__ == "__main__":
    main()
