"""What a model and its gradient do on SmoothGrad's noisy copies, to explain how quality changes with σ.

Per σ, over a few noisy copies per image (the engine's own noise, rebuilt from
its stateless generator and checked against it): how often the copy's top-1
is still the clean target, which class the copies collapse to, where the
global-max-pooling units that carry the target score sit (on the object or
not), and the single noisy gradient's mass in mask, split by whether the copy
still shows the target.

Gradients come from the engine (:class:`transforms.smoothgrad.SmoothGrad`);
nothing here differentiates the model itself.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import tensorflow as tf
import keras

from transforms.engine import noise
from transforms.engine.smoothgrad import SmoothGrad, SmoothGradResult

logger = logging.getLogger(__name__)


def noisy_copies(images: np.ndarray, keys: list[str], seed: int, sigma: float, sample_index: int,
                 noise_mode: str = "relative") -> np.ndarray:
    """The engine's noisy copy number ``sample_index`` of each image.

    The same noise as ``SmoothGrad(..., noise=sigma, noise_mode=noise_mode,
    seed=seed)`` adds for that sample: the stream of ``(key_seed(seed, key),
    sample_index)`` scaled by the engine's per-image σ.

    Args:
        images: preprocessed images, ``float32 [B, H, W, C]``.
        keys: one key per image.
        seed: the engine's global noise seed.
        sigma: σ, relative or absolute as ``noise_mode`` says.
        sample_index: the noise sample (the engine's ``sample_offset`` + sample number).
        noise_mode: ``relative`` or ``absolute``.

    Returns:
        ``float32 [B, H, W, C]``.
    """
    scale = noise.sigma_per_image(images, sigma, noise_mode)[:, None, None, None]
    seeds = np.array([noise.key_seed(seed, key) for key in keys], np.int64)
    pairs = np.stack([seeds, np.full(len(keys), sample_index, np.int64)], axis=1)
    draws = noise.standard_normal(tf.constant(pairs), tuple(images.shape[1:])).numpy()
    return images + scale * draws


class Probe:
    """The engine's gradient, the model's top-1 and its global-max-pool evidence on given images.

    :meth:`look` runs a noise-free engine explainer (N=1, σ=0, ``target="label"``,
    the default ``mean_abs`` channel reduction) on whatever images it gets, so
    on a rebuilt noisy copy it gives the map the engine computes for that
    copy (:func:`check_noise_reconstruction` measures the difference).

    Args:
        model: the Keras model.
        batch_size: the engine's batch size.
        jit: the engine's ``jit`` mode.
    """

    def __init__(self, model, *, batch_size: int = 50, jit: str = "graph"):
        self.model = model
        self.explainer = SmoothGrad(model, samples=1, noise=0.0, target="label", batch_size=batch_size, jit=jit)
        self.features = self.dense = None
        pools = [layer for layer in model.layers if isinstance(layer, keras.layers.GlobalMaxPooling2D)]
        last = model.layers[-1]
        if pools and isinstance(last, keras.layers.Dense) and last.input is pools[-1].output:
            self.features = keras.Model(model.inputs, pools[-1].input)
            self.dense = last.get_weights()[0]  # [channels, classes]

    def look(self, images: np.ndarray, keys: list[str], targets: np.ndarray) -> SmoothGradResult:
        """The engine's plain-gradient result at ``images`` for ``targets``.

        Returns:
            A :class:`SmoothGradResult`: ``maps`` (mean |gradient| over
            channels), ``predicted`` (the model's top-1 on ``images``) and
            ``scores`` (the target's pre-softmax score on ``images``).
        """
        return self.explainer(images, keys, np.asarray(targets).astype(np.int32))

    def evidence_on_object(self, images: np.ndarray, targets: np.ndarray, masks: np.ndarray):
        """Share of the target's positive global-max-pool contributions whose unit sits on the object.

        For every channel c the global max picks one cell of the last feature
        map; its contribution to the target score is ``w[c, target] * max_c``.

        Returns:
            ``(share of positive contribution on object cells, share of cells
            that touch the object = chance)``, ``float [B]`` each, or None when
            the model has no GlobalMaxPooling2D -> Dense head.
        """
        if self.features is None:
            return None
        features = self.features.predict(images, verbose=0, batch_size=100)
        count, rows, cols, channels = features.shape
        block_r, block_c = masks.shape[1] // rows, masks.shape[2] // cols
        cells = masks[:, :rows * block_r, :cols * block_c].reshape(count, rows, block_r, cols, block_c)
        cells = cells.any(axis=(2, 4)).reshape(count, rows * cols)
        flat = features.reshape(count, rows * cols, channels)
        where, peak = flat.argmax(axis=1), flat.max(axis=1)
        contribution = np.maximum(self.dense[:, targets].T * peak, 0.0)
        on_object = np.take_along_axis(cells, where, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = (contribution * on_object).sum(axis=1) / contribution.sum(axis=1)
        return share, cells.mean(axis=1)


def check_noise_reconstruction(probe: Probe, images: np.ndarray, keys: list[str], seed: int, batch_size: int,
                               jit: str, sigma: float = 0.1, sample_index: int = 3) -> float:
    """How far the maps of the rebuilt noisy copies are from the engine's own noisy-sample maps.

    Compares ``SmoothGrad(samples=1, noise=sigma, noise_mode="relative",
    sample_offset=sample_index)`` (the engine's map of that noisy sample) with
    the probe's noise-free map of :func:`noisy_copies` on the first batch.

    Returns:
        The largest |difference| relative to the largest |value| of the
        engine's maps: 0 when the copies are rebuilt exactly.
    """
    explainer = SmoothGrad(probe.model, samples=1, noise=sigma, noise_mode="relative", batch_size=batch_size,
                           jit=jit, seed=seed, sample_offset=sample_index)
    count = min(batch_size, len(images))
    result = explainer(images[:count], keys[:count])
    copies = noisy_copies(images[:count], keys[:count], seed, sigma, sample_index)
    rebuilt = probe.look(copies, keys[:count], result.targets).maps
    return float(np.abs(rebuilt - result.maps).max() / max(np.abs(result.maps).max(), 1e-30))


def noisy_copy_diagnostics(probe: Probe, images: np.ndarray, keys: list[str], masks: np.ndarray,
                           targets: np.ndarray, labels: np.ndarray, sigmas: list[float], copies: int, seed: int,
                           class_names: list[str]) -> list[dict]:
    """Per σ: what the model and its gradient do on the engine's noisy copies.

    Args:
        probe: the :class:`Probe` of the model.
        images: preprocessed images, ``float32 [B, H, W, C]``.
        keys: one key per image (it seeds the noise).
        masks: object masks, ``bool [B, H, W]``.
        targets: the explained class per image (the clean top-1).
        labels: the true class per image.
        sigmas: relative σ values; a σ=0 row (the clean image) comes first.
        copies: noisy copies per image and σ.
        seed: the engine's noise seed.
        class_names: names of the model's classes.

    Returns:
        One JSON-ready row per σ.
    """
    clean = probe.look(images, keys, targets)
    clean_inside = (clean.maps * masks).sum(axis=(1, 2))
    clean_outside = (clean.maps * ~masks).sum(axis=(1, 2))
    clean_evidence = probe.evidence_on_object(images, targets, masks)
    count = len(images)
    index = np.arange(count)
    rows = []
    for sigma in [0.0] + list(sigmas):
        started = time.perf_counter()
        agree, correct, predicted, target_logit, share, hit, inside, outside, evidence = ([] for _ in range(9))
        for copy in range(copies if sigma > 0 else 1):
            noisy = noisy_copies(images, keys, seed, sigma, copy) if sigma > 0 else images
            seen = probe.look(noisy, keys, targets) if sigma > 0 else clean
            top = seen.predicted
            agree.append(top == targets)
            correct.append(top == labels)
            predicted.append(top)
            target_logit.append(seen.scores)
            magnitude = seen.maps.astype(np.float64)
            total = magnitude.sum(axis=(1, 2))
            inside.append((magnitude * masks).sum(axis=(1, 2)))
            outside.append((magnitude * ~masks).sum(axis=(1, 2)))
            share.append(inside[-1] / total)
            peaks = magnitude.reshape(count, -1).argmax(axis=1)
            hit.append(masks.reshape(count, -1)[index, peaks])
            found = probe.evidence_on_object(noisy, targets, masks)
            if found is not None:
                evidence.append(found[0])
        agree, share, hit = np.array(agree), np.array(share), np.array(hit)
        inside, outside = np.array(inside), np.array(outside)
        counts = np.bincount(np.concatenate(predicted), minlength=len(class_names))
        row = {
            "sigma_rel": sigma,
            "sigma_abs_mean": round(float(noise.sigma_per_image(images, sigma, "relative").mean()), 4),
            "copies_per_image": int(agree.shape[0]),
            "top1_agrees_with_clean_target": round(float(agree.mean()), 4),
            "images_with_majority_agreeing": round(float((agree.mean(axis=0) > 0.5).mean()), 4),
            "accuracy_on_copies": round(float(np.mean(correct)), 4),
            "most_predicted_class": class_names[int(counts.argmax())],
            "most_predicted_share": round(float(counts.max() / counts.sum()), 4),
            "target_logit_mean": round(float(np.mean(target_logit)), 3),
            "copy_mass_in_mask": round(float(np.nanmean(share)), 4),
            "copy_mass_in_mask_if_agrees": round(float(np.nanmean(share[agree])), 4) if agree.any() else None,
            "copy_mass_in_mask_if_not": round(float(np.nanmean(share[~agree])), 4) if (~agree).any() else None,
            # Mass-weighted pooling of the copies' shares = mass in mask of their mean |g| (SmoothGrad).
            "pooled_mass_in_mask": round(float(np.nanmean(inside.sum(axis=0) / (inside + outside).sum(axis=0))), 4),
            "copy_pointing": round(float(hit.mean()), 4),
            "inside_mass_vs_clean_median": round(float(np.median(inside.mean(axis=0) / clean_inside)), 3),
            "outside_mass_vs_clean_median": round(float(np.median(outside.mean(axis=0) / clean_outside)), 3),
            "seconds": round(time.perf_counter() - started, 2),
        }
        if evidence:
            row["evidence_on_object"] = round(float(np.nanmean(evidence)), 4)
            row["evidence_chance"] = round(float(clean_evidence[1].mean()), 4)
        rows.append(row)
        logger.info("  diag σ=%g: top-1 kept %.3f, copy mass %.3f, evidence on object %s", sigma,
                    row["top1_agrees_with_clean_target"], row["copy_mass_in_mask"], row.get("evidence_on_object"))
    return rows
