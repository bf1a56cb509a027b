"""Sanity checks for saliency maps, after Adebayo et al. 2018 (*Sanity Checks for Saliency Maps*).

* **Model-parameter randomisation**: re-initialise the model's weighted layers
  from the top down (a cascade) and measure the Spearman rank correlation
  between the original maps and the maps of the randomised model. A method that
  explains the model, not the image, loses correlation as layers are
  randomised.
* **Convergence**: split the N samples into two disjoint halves, compute a map
  from each, and measure their rank correlation. Near 1 means N was large
  enough for the maps to have settled; low values mean more samples are needed.

Both work on any Keras model the engine accepts and on numpy arrays, without Beam;
:func:`run_sanity_checks` runs both for the pipeline on a sample of decoded examples.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from transforms.support.errors import one_line
from transforms.engine.smoothgrad import SmoothGrad
from transforms.engine.statistics import rank_correlation

logger = logging.getLogger(__name__)


def _mean_correlation(maps_a: np.ndarray, maps_b: np.ndarray) -> float | None:
    values = [rank_correlation(a, b) for a, b in zip(maps_a, maps_b)]
    values = [value for value in values if np.isfinite(value)]
    return float(np.mean(values)) if values else None


def convergence(model, images: np.ndarray, keys: list[str], **engine_args) -> dict:
    """Split-half rank correlation of the maps from two disjoint halves of the N samples.

    Args:
        model: the Keras model.
        images: preprocessed float32 ``[B, H, W, C]``.
        keys: one key per image (the noise depends on it).
        **engine_args: :class:`SmoothGrad` options; ``samples`` is split in two.

    Returns:
        ``{"samples_per_half", "split_half_rank_correlation"}`` (mean over images).
    """
    samples = int(engine_args.pop("samples", 20))
    half = max(1, samples // 2)
    first = SmoothGrad(model, samples=half, sample_offset=0, **engine_args)(images, keys)
    second = SmoothGrad(model, samples=half, sample_offset=half, **engine_args)(images, keys)
    return {"samples_per_half": half,
            "split_half_rank_correlation": _mean_correlation(first.maps, second.maps)}


def _weighted_layers(model) -> list:
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if layer.trainable_weights and not getattr(layer, "layers", None)]


def randomisation(model, images: np.ndarray, keys: list[str], steps: int = 4, seed: int = 0,
                  **engine_args) -> dict:
    """Cascading model-parameter randomisation (top layer first).

    The model is cloned; the clone's weighted layers are re-initialised from the
    output down, in ``steps`` cumulative stages (the top layer alone, then more
    of the stack, ending with every layer). The target class is fixed to the
    original model's, so the maps compare the same question.

    Returns:
        ``{"layers_total", "cascade": [{"layers_randomised", "down_to",
        "rank_correlation"}, ...]}``, correlations averaged over images.
    """
    import keras

    engine_args = dict(engine_args)
    original = SmoothGrad(model, **engine_args)
    reference = original(images, keys)
    engine_args["target"] = "label"
    targets = reference.targets if reference.targets.ndim == 1 else reference.targets[:, 0]
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    layers = _weighted_layers(clone)[::-1]  # top first
    if not layers:
        return {"layers_total": 0, "cascade": []}
    cut_points = sorted({max(1, round(len(layers) * (stage + 1) / steps)) for stage in range(steps)} | {1})
    rng = np.random.default_rng(seed)
    cascade, done = [], 0
    for cut in cut_points:
        for layer in layers[done:cut]:
            # Gaussian weights with each tensor's own spread: the scale of the
            # trained weights is kept, their learned structure is destroyed.
            for variable in layer.trainable_weights:
                value = np.asarray(variable.numpy())
                variable.assign(rng.normal(0.0, float(np.std(value)) or 0.05, size=value.shape).astype(value.dtype))
        done = cut
        randomised = SmoothGrad(clone, **engine_args)(images, keys, targets)
        cascade.append({"layers_randomised": cut, "down_to": layers[cut - 1].name,
                        "rank_correlation": _mean_correlation(reference.maps if reference.maps.ndim == randomised.maps.ndim
                                                              else reference.maps[:, 0], randomised.maps)})
    return {"layers_total": len(layers), "cascade": cascade}


def run_sanity_checks(examples, settings) -> dict:
    """Both checks on a sample of decoded examples, for the manifest; a failing check is reported, never raised.

    Args:
        examples: decoded examples (``key`` and ``image`` used), any order.
        settings: an :class:`transforms.explain.explain.ExplainSettings` (model source and engine options).

    Returns:
        ``{"records", "keys", "convergence", "randomisation", "seconds"}``, or
        ``{"records": 0}`` without examples.
    """
    import tensorflow as tf

    from transforms.support.models import load_model

    examples = sorted(examples, key=lambda example: example.key)
    if not examples:
        return {"records": 0}
    model = load_model(settings.model, settings.weights, safe_mode=settings.safe_mode)
    images = np.stack([example.image for example in examples])
    keys = [example.key for example in examples]
    engine_args = dict(settings.engine, reliability=False)  # the checks compare whole maps only
    adaptive = {key: engine_args.pop(key, None) for key in ("target_reliability", "min_samples", "max_samples")}
    per_check = {}
    if engine_args.get("samples") == "auto":  # fixed counts: convergence at the most, randomisation at the least
        per_check = {"convergence": adaptive["max_samples"], "randomisation": adaptive["min_samples"]}
    if str(engine_args.get("target")) == "label":
        engine_args["target"] = "top1"  # the checks compare maps of one fixed class per image
    if not tf.config.list_logical_devices("GPU"):
        engine_args["jit"] = "graph"  # each cascade step is a new model: XLA compiles cost more than they save
    started = time.time()
    figures = {"records": len(keys), "keys": keys}
    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # each randomised model is a new function: retracing is expected
    try:
        for name, check in (("convergence", convergence), ("randomisation", randomisation)):
            try:
                figures[name] = check(model, images, keys, **dict(engine_args, **(
                    {"samples": per_check[name]} if per_check else {})))
            except Exception as error:  # noqa: BLE001 - a failed check is reported, never fatal
                logger.warning("Sanity check %s failed: %s", name, error)
                figures[name] = {"error": one_line(f"{type(error).__name__}: {error}")}
    finally:
        tf_logger.setLevel(level)
    figures["seconds"] = round(time.time() - started, 1)
    return figures
