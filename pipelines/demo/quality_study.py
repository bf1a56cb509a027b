"""The explanation-quality study on the demo's held-out split, as one function returning a report.

Every demo image's class is decided by one object whose pixel mask is stored
with the image (:mod:`pipelines.demo`), so a saliency map can be scored by its
mass in mask and pointing (:mod:`pipelines.demo.quality_figures`). The study scores
the settings of :mod:`pipelines.demo.quality_configs` on the demo model, runs the
noisy-copy diagnostics of :mod:`pipelines.demo.quality_diagnostics`, and repeats a
smaller set on a control: a copy of the demo model fine-tuned for a few epochs
with Gaussian input noise (in memory, never saved). If the loss of mass with σ
comes from the model not recognising noisy copies, it should disappear on the
control. ``python benchmarks/quality.py`` is its command line.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import time

import numpy as np
import tensorflow as tf
import keras

from pipelines.demo import demo
from pipelines.demo.quality_configs import Config, control_configs, evaluate, main_configs
from pipelines.demo.quality_diagnostics import Probe, check_noise_reconstruction, noisy_copy_diagnostics
from pipelines.demo.quality_figures import MaskScorer
from pipelines.demo.quality_report import save_examples

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What the study runs on and with (the command line's options).

    Attributes:
        data: the demo folder (``python -m pipelines.demo --out DIR`` makes it).
        split: the held-out split to score.
        limit: score only the first ``limit`` images (None: the whole split).
        samples: the SmoothGrad N grid.
        sigmas: the relative σ grid.
        small_sigmas: extra small relative σ, SmoothGrad at ``variant_samples`` only.
        variant_samples: N for SmoothGrad², VarGrad, the signed mean and Gradient×Input.
        variant_sigmas: relative σ for those variants.
        diag_copies: noisy copies per image for the diagnostics.
        seed: noise, bootstrap and fine-tuning seed.
        batch_size: the engine's batch size.
        jit: the engine's ``jit`` mode.
        bootstrap: bootstrap resamples for the 95 % intervals.
        control_epochs: epochs of noise fine-tuning for the control model (0: no control).
        control_noise: largest absolute input-noise σ in the control's fine-tuning.
        examples: save a PNG grid of example maps here (None: no grid).
    """

    data: str = "demo_data"
    split: str = "test"
    limit: int | None = None
    samples: tuple[int, ...] = (10, 20, 50)
    sigmas: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3)
    small_sigmas: tuple[float, ...] = (0.01, 0.02)
    variant_samples: int = 20
    variant_sigmas: tuple[float, ...] = (0.05, 0.1, 0.15)
    diag_copies: int = 20
    seed: int = 0
    batch_size: int = 50
    jit: str = "graph"
    bootstrap: int = 2000
    control_epochs: int = 4
    control_noise: float = 0.45
    examples: str | None = None


def noise_tuned_copy(model_path: str, data_dir: str, epochs: int, max_noise: float, seed: int,
                     eval_images: np.ndarray, eval_labels: np.ndarray) -> tuple[keras.Model, dict]:
    """A copy of the demo model fine-tuned on the train split with Gaussian input noise.

    Each training image gets noise of a σ drawn uniformly in [0, ``max_noise``]
    (input units). Adam 1e-3 with cosine decay, batch 32. Kept in memory only.

    Args:
        model_path: the demo model's ``.keras`` file.
        data_dir: the demo folder (its ``train`` split is used).
        epochs: fine-tuning epochs.
        max_noise: the largest noise σ, in preprocessed input units.
        seed: Keras seed (weights, noise) and shuffling seed.
        eval_images: preprocessed images to measure the clean accuracy on.
        eval_labels: their labels.

    Returns:
        ``(model, summary)``: the fine-tuned model and a JSON-ready summary.
    """
    keras.utils.set_random_seed(seed)
    train = demo.load_split(data_dir, "train")
    model = keras.saving.load_model(model_path, safe_mode=True)

    def add_noise(batch, label):
        """Scales a uint8 batch to [-1, 1] and adds noise of a random σ per image."""
        batch = tf.cast(batch, tf.float32) / 127.5 - 1.0
        sigma = tf.random.uniform([tf.shape(batch)[0], 1, 1, 1], 0.0, max_noise)
        return batch + sigma * tf.random.normal(tf.shape(batch)), label

    dataset = (tf.data.Dataset.from_tensor_slices((train["image"], train["label"]))
               .shuffle(len(train["label"]), seed=seed).batch(32).map(add_noise).prefetch(2))
    steps = epochs * math.ceil(len(train["label"]) / 32)
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(dataset, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - started
    accuracy = float((model.predict(eval_images, verbose=0, batch_size=100).argmax(axis=1) == eval_labels).mean())
    return model, {"epochs": epochs, "max_noise_abs": max_noise, "train_images": int(len(train["label"])),
                   "seconds": round(seconds, 1), "clean_accuracy": round(accuracy, 4)}


def _example_columns(settings: StudySettings, maps: dict, control_maps: dict,
                     chosen: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The example grid's map columns: the settings below that were run, on the ``chosen`` images."""
    variant_n = settings.variant_samples
    wanted = [("gradient", Config("gradient"))]
    wanted += [(f"SG σ={s:g}", Config("SmoothGrad", samples=max(settings.samples), noise=s)) for s in (0.05, 0.1, 0.2)]
    wanted += [(f"SG σ={s:g} N={variant_n}", Config("SmoothGrad", samples=variant_n, noise=s))
               for s in settings.small_sigmas[-1:]]
    wanted += [(f"VarGrad σ={s:g}", Config("VarGrad", variant="vargrad", samples=variant_n, noise=s))
               for s in settings.variant_sigmas[:1]]
    columns = [(title, maps[config][chosen]) for title, config in wanted if config in maps]
    columns += [(f"tuned: {title}", control_maps[config][chosen]) for title, config in
                (("gradient", Config("gradient")),
                 ("SG σ=0.1", Config("SmoothGrad", samples=variant_n, noise=0.1)),
                 ("SG σ=0.2", Config("SmoothGrad", samples=variant_n, noise=0.2)))
                if config in control_maps]
    return columns


def run_study(settings: StudySettings, *, command: str = "", recorded_settings: dict | None = None) -> dict:
    """Runs the whole study and returns its report (a JSON-ready dict).

    Args:
        settings: what to run.
        command: the command line, recorded in the report.
        recorded_settings: the settings as the caller wants them recorded
            (default: ``settings`` as a dict).

    Returns:
        The report: provenance, the chance levels, ``configs`` (one row per
        setting), ``diagnostics`` (one row per σ), and with a control model
        ``control``, ``control_configs`` and ``control_diagnostics``; with
        ``settings.examples``, ``examples`` describes the saved grid.

    Raises:
        FileNotFoundError: when the demo folder has no model or no such split.
    """
    started_run = time.perf_counter()
    model_path = os.path.join(settings.data, demo.MODEL_FILENAME)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"no {demo.MODEL_FILENAME} in {settings.data!r}; make the demo folder with "
                                f"`python -m pipelines.demo --out {settings.data}`.")
    card_path = os.path.join(settings.data, demo.CARD_FILENAME)
    card = {}
    if os.path.isfile(card_path):
        with open(card_path, encoding="utf-8") as handle:
            card = json.load(handle)
    data = demo.load_split(settings.data, settings.split)
    stop = settings.limit or len(data["label"])
    images_uint8, masks, labels = data["image"][:stop], data["mask"][:stop], data["label"][:stop]
    keys = [key.decode() if isinstance(key, bytes) else str(key) for key in data["id"][:stop]]
    images = demo.preprocess(images_uint8)
    model = keras.saving.load_model(model_path, safe_mode=True)
    class_names = list(demo.CLASS_NAMES)
    engine_options = {"batch_size": settings.batch_size, "jit": settings.jit, "seed": settings.seed}

    scorer = MaskScorer.build(masks, settings.bootstrap, settings.seed)
    probe = Probe(model, batch_size=settings.batch_size, jit=settings.jit)
    clean_top1 = probe.look(images, keys, labels).predicted
    report = {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "tensorflow": tf.__version__, "keras": keras.__version__},
        "data": settings.data, "split": settings.split, "images": len(images),
        "demo_card": {key: card.get(key) for key in ("test_accuracy", "object_area_share", "train_count",
                                                     "test_count", "model")},
        "clean_accuracy_scored_images": round(float((clean_top1 == labels).mean()), 4),
        "chance": round(scorer.chance, 4),
        "chance_per_image_mean": round(float(masks.mean(axis=(1, 2)).mean()), 4),
        "dilated_chance": {str(radius): round(float(grown.mean()), 4) for radius, grown in scorer.dilated.items()},
        "region_area": {name: round(float(region.mean()), 4) for name, region in scorer.regions.items()},
        "settings": dataclasses.asdict(settings) if recorded_settings is None else dict(recorded_settings),
    }
    logger.info("%d images, clean accuracy %.3f, chance %.4f", len(images), report["clean_accuracy_scored_images"],
                scorer.chance)

    report["noise_reconstruction_max_rel_diff"] = check_noise_reconstruction(
        probe, images, keys, settings.seed, settings.batch_size, settings.jit)
    logger.info("noise rebuilt from the engine's generator: max relative difference %.2e",
                report["noise_reconstruction_max_rel_diff"])

    configs = main_configs(list(settings.samples), list(settings.sigmas), list(settings.small_sigmas),
                           settings.variant_samples, list(settings.variant_sigmas))
    report["configs"], maps = evaluate(model, configs, images, keys, scorer, tag="demo", **engine_options)
    diag_sigmas = sorted(set(settings.small_sigmas) | set(settings.sigmas))
    report["diagnostics"] = noisy_copy_diagnostics(probe, images, keys, masks, clean_top1, labels, diag_sigmas,
                                                   settings.diag_copies, settings.seed, class_names)

    control_maps = {}
    if settings.control_epochs > 0:
        control_model, report["control"] = noise_tuned_copy(model_path, settings.data, settings.control_epochs,
                                                            settings.control_noise, settings.seed, images, labels)
        logger.info("control model: %s", report["control"])
        report["control_configs"], control_maps = evaluate(
            control_model, control_configs(settings.variant_samples, diag_sigmas, list(settings.variant_sigmas)),
            images, keys, scorer, tag="control", **engine_options)
        control_probe = Probe(control_model, batch_size=settings.batch_size, jit=settings.jit)
        control_top1 = control_probe.look(images, keys, labels).predicted
        report["control_diagnostics"] = noisy_copy_diagnostics(
            control_probe, images, keys, masks, control_top1, labels, diag_sigmas, settings.diag_copies,
            settings.seed, class_names)

    if settings.examples:
        chosen = np.flatnonzero(clean_top1 == labels)[:8]
        columns = _example_columns(settings, maps, control_maps, chosen)
        save_examples(settings.examples, images_uint8[chosen], masks[chosen], columns)
        report["examples"] = {"path": settings.examples, "keys": [keys[i] for i in chosen],
                              "columns": ["image", "mask"] + [title for title, _ in columns]}

    report["total_seconds"] = round(time.perf_counter() - started_run, 1)
    return report
