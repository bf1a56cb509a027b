"""Explanation quality of SmoothGrad and its variants on the demo's held-out split (issue 5).

Every demo image's class is decided by one object whose pixel mask is stored
with the image (``pipelines/demo.py``), so a saliency map can be scored by the
two figures the pipeline stores in its corpus columns
(``transforms.postprocess.mask_figures``):

* **mass in mask**: the share of the map's |mass| that falls on the object;
* **pointing**: whether the map's largest |value| lies on the object.

The chance level of both is the object's area share (a map spread evenly, or a
peak dropped at random, scores it). Means come with 95 % bootstrap intervals
over images; "Δ vs gradient" is the paired difference with the plain gradient
on the same images.

Configurations (the engine API, not Beam, on preprocessed ``x/127.5-1`` images):
the plain gradient (N=1, σ=0), SmoothGrad over an N × relative σ grid, a few
smaller σ, absolute σ=0.1 (the engine's default and the demo config), and
SmoothGrad², VarGrad, the signed mean gradient (the paper's SmoothGrad:
|mean g| rather than mean |g|) and Gradient×Input at N=20.

Diagnostics, to explain how mass in mask changes with σ:

* per σ, over ``--diag-copies`` noisy copies per image (the engine's own noise,
  rebuilt from its stateless generator and checked against it): how often the
  copy's top-1 is still the clean target, which class the copies collapse to,
  where the global-max-pooling units that carry the target score sit (on the
  object or not), and the single noisy gradient's mass in mask, split by whether
  the copy still shows the target;
* mass in the object dilated by 1, 2 and 4 pixels and in rings around it (does
  smoothing only blur mass over the edge, or does mass move to the background?);
* a control: a copy of the demo model fine-tuned for a few epochs with Gaussian
  input noise (in memory, never saved), explained with the same settings. If
  the loss of mass with σ comes from the model not recognising noisy copies,
  it should disappear on this model.

``--examples PNG`` saves a grid of maps (image, mask, gradient, SmoothGrad at a
few σ, VarGrad, the control model) for a look by eye.

Make the demo folder first (a few minutes, offline)::

    python -m pipelines.demo --out demo_data
    python benchmarks/quality.py --data demo_data --out quality.json \\
        --markdown quality.md --examples benchmarks/quality_examples.png

The whole run takes about 5-10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from pipelines import demo  # noqa: E402
from transforms import smoothgrad as engine  # noqa: E402
from transforms.postprocess import mask_figures  # noqa: E402

DILATIONS = (1, 2, 4)
# Rings of pixels, from the object's inside out (8-neighbour distance to the object's edge).
REGIONS = ("interior", "border", "ring 1", "ring 2", "ring 3-4", "far")


# --------------------------------------------------------------------------
# Masks and figures
# --------------------------------------------------------------------------


def dilate(masks: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``bool [B, H, W]`` masks by a 3x3 square, ``radius`` times."""
    out = masks.copy()
    for _ in range(radius):
        padded = np.pad(out, ((0, 0), (1, 1), (1, 1)))
        grown = np.zeros_like(out)
        for dr in (0, 1, 2):
            for dc in (0, 1, 2):
                grown |= padded[:, dr:dr + out.shape[1], dc:dc + out.shape[2]]
        out = grown
    return out


def erode(masks: np.ndarray, radius: int) -> np.ndarray:
    return ~dilate(~masks, radius)


def region_masks(masks: np.ndarray) -> dict[str, np.ndarray]:
    """The object's interior and 1-px border, then rings outside it, then the far background."""
    inner = erode(masks, 1)
    grown = {radius: dilate(masks, radius) for radius in (1, 2, 4)}
    return {
        "interior": inner,
        "border": masks & ~inner,
        "ring 1": grown[1] & ~masks,
        "ring 2": grown[2] & ~grown[1],
        "ring 3-4": grown[4] & ~grown[2],
        "far": ~grown[4],
    }


def map_figures(maps: np.ndarray, masks: np.ndarray, dilated: dict[int, np.ndarray],
                regions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-image figures of ``maps [B, H, W]`` (or ``[B, H, W, C]``); NaN where a map has no mass."""
    magnitude = np.abs(maps.astype(np.float64))
    if magnitude.ndim == 4:
        magnitude = magnitude.sum(axis=-1)
    total = magnitude.sum(axis=(1, 2))
    mass, hit = np.full(len(maps), np.nan), np.full(len(maps), np.nan)
    for index, (saliency, mask) in enumerate(zip(maps, masks)):
        inside, peak_inside = mask_figures(saliency, mask)  # the pipeline's own figures
        if inside is not None:
            mass[index], hit[index] = inside, float(peak_inside)
    with np.errstate(invalid="ignore", divide="ignore"):
        figures = {"mass": mass, "pointing": hit}
        peaks = magnitude.reshape(len(maps), -1).argmax(axis=1)
        for radius, grown in dilated.items():
            figures[f"mass_dilated_{radius}"] = (magnitude * grown).sum(axis=(1, 2)) / total
            # Peak within ``radius`` px of the object (NaN where the map has no mass).
            near = grown.reshape(len(maps), -1)[np.arange(len(maps)), peaks].astype(np.float64)
            figures[f"pointing_dilated_{radius}"] = np.where(total > 0, near, np.nan)
        for name, region in regions.items():
            figures[f"region {name}"] = (magnitude * region).sum(axis=(1, 2)) / total
        # Share of the map's mass on its top 5 % pixels: how peaked the map is.
        flat = np.sort(magnitude.reshape(len(maps), -1), axis=1)[:, ::-1]
        figures["top5pct_mass"] = flat[:, :max(1, flat.shape[1] // 20)].sum(axis=1) / total
    return figures


def bootstrap_indices(count: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def mean_ci(values: np.ndarray, resamples: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95 % percentile-bootstrap interval over images (NaNs ignored)."""
    values = np.asarray(values, np.float64)
    if np.isnan(values).all():
        return math.nan, math.nan, math.nan
    draws = np.nanmean(values[resamples], axis=1)
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return float(np.nanmean(values)), float(low), float(high)


# --------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    variant: str = "smoothgrad"
    samples: int = 1
    noise: float = 0.0
    noise_mode: str = "relative"

    def label(self) -> str:
        if self.noise == 0:
            return f"{self.name} (N=1, σ=0)"
        return f"{self.name} N={self.samples} σ={self.noise:g} {self.noise_mode[:3]}"


def main_configs(samples: list[int], sigmas: list[float], small_sigmas: list[float],
                 variant_samples: int, variant_sigmas: list[float]) -> list[Config]:
    configs = [Config("gradient")]
    configs += [Config("SmoothGrad", samples=n, noise=s) for s in sigmas for n in samples]
    configs += [Config("SmoothGrad", samples=variant_samples, noise=s) for s in small_sigmas]
    configs.append(Config("SmoothGrad", samples=20, noise=0.1, noise_mode="absolute"))
    configs.append(Config("SmoothGrad²", variant="smoothgrad_squared"))  # plain g², SG²'s own baseline
    configs.append(Config("Gradient×Input", variant="grad_x_input"))
    for name, variant in (("signed mean", "signed"), ("SmoothGrad²", "smoothgrad_squared"),
                          ("VarGrad", "vargrad"), ("Gradient×Input", "grad_x_input")):
        configs += [Config(name, variant=variant, samples=variant_samples, noise=s) for s in variant_sigmas]
    unique = []
    for config in configs:
        if config not in unique:
            unique.append(config)
    return unique


def run_config(model, config: Config, images, keys, batch_size: int, jit: str, seed: int):
    explainer = engine.SmoothGrad(model, samples=config.samples, noise=config.noise, noise_mode=config.noise_mode,
                                  variant=config.variant, batch_size=batch_size, jit=jit, seed=seed)
    explainer(images[:batch_size], keys[:batch_size])  # trace once, outside the timing
    started = time.perf_counter()
    result = explainer(images, keys)
    seconds = time.perf_counter() - started
    return result, seconds, explainer


def summarise(config: Config, figures: dict, resamples, baseline: dict | None, seconds: float,
              count: int, sigma_abs: float, chance: float) -> dict:
    row = {"config": config.label(), **dataclasses.asdict(config), "seconds": round(seconds, 3),
           "ms_per_image": round(1000 * seconds / count, 2), "sigma_abs_mean": round(sigma_abs, 4),
           "unscored": int(np.isnan(figures["mass"]).sum())}
    for key, values in figures.items():
        mean, low, high = mean_ci(values, resamples)
        row[key] = {"mean": round(mean, 4), "ci95": [round(low, 4), round(high, 4)]}
    row["mass_over_chance"] = round(row["mass"]["mean"] / chance, 2)
    row["pointing_over_chance"] = round(row["pointing"]["mean"] / chance, 2)
    if baseline is not None:
        for key in ("mass", "pointing"):
            mean, low, high = mean_ci(figures[key] - baseline[key], resamples)
            row[f"{key}_minus_gradient"] = {"mean": round(mean, 4), "ci95": [round(low, 4), round(high, 4)]}
        row["mass_beats_gradient_share"] = round(float(np.nanmean(figures["mass"] > baseline["mass"])), 3)
    return row


# --------------------------------------------------------------------------
# Diagnostics on noisy copies
# --------------------------------------------------------------------------


def engine_noise(keys: list[str], seed: int, sample_index: int, shape) -> np.ndarray:
    """The engine's standard-normal noise for sample ``sample_index`` of each key.

    Rebuilt with the engine's own (private) generator; checked against the
    engine's maps in :func:`check_noise_reconstruction`.
    """
    seeds = np.array([engine.key_seed(seed, key) for key in keys], np.int64)
    pairs = np.stack([seeds, np.full(len(keys), sample_index, np.int64)], axis=1)
    return engine._standard_normal(tf.constant(pairs), tuple(shape)).numpy()


def relative_sigma(images: np.ndarray, noise: float) -> np.ndarray:
    flat = images.reshape(len(images), -1)
    return (noise * (flat.max(axis=1) - flat.min(axis=1))).astype(np.float32)


class Probe:
    """Scores, per-copy gradient maps and global-max-pool evidence of one model."""

    def __init__(self, model):
        self.model = model
        self.score_fn, _ = engine.score_function(model, logits=True)
        shape = tuple(model.input_shape[1:])

        @tf.function(input_signature=[tf.TensorSpec((None,) + shape, tf.float32), tf.TensorSpec([None], tf.int32)],
                     autograph=False)
        def gradients(images, targets):
            with tf.GradientTape() as tape:
                tape.watch(images)
                scores = self.score_fn(images)
                objective = tf.reduce_sum(tf.gather(scores, targets, batch_dims=1))
            grads = tape.gradient(objective, images)
            return tf.reduce_mean(tf.abs(grads), axis=-1), scores  # the engine's mean_abs reduce

        self._gradients = gradients
        self.features = self.dense = None
        pools = [layer for layer in model.layers if isinstance(layer, keras.layers.GlobalMaxPooling2D)]
        last = model.layers[-1]
        if pools and isinstance(last, keras.layers.Dense) and last.input is pools[-1].output:
            self.features = keras.Model(model.inputs, pools[-1].input)
            self.dense = last.get_weights()[0]  # [channels, classes]

    def gradients(self, images: np.ndarray, targets: np.ndarray, batch: int = 100):
        maps, scores = [], []
        for start in range(0, len(images), batch):
            m, s = self._gradients(tf.constant(images[start:start + batch]),
                                   tf.constant(targets[start:start + batch].astype(np.int32)))
            maps.append(m.numpy())
            scores.append(s.numpy())
        return np.concatenate(maps), np.concatenate(scores)

    def evidence_on_object(self, images: np.ndarray, targets: np.ndarray, masks: np.ndarray):
        """Share of the target's positive global-max-pool contributions whose unit sits on the object.

        For every channel c the global max picks one cell of the last feature
        map; its contribution to the target score is ``w[c, target] * max_c``.
        Returns (share of positive contribution on object cells, share of
        cells that touch the object = chance) per image, or None without a
        GlobalMaxPooling2D -> Dense head.
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


def check_noise_reconstruction(model, probe: Probe, images, keys, seed: int, batch_size: int, jit: str) -> float:
    """Max |difference| between the engine's single-sample map and the rebuilt one (0 when exact)."""
    noise, index = 0.1, 3
    explainer = engine.SmoothGrad(model, samples=1, noise=noise, noise_mode="relative", batch_size=batch_size,
                                  jit=jit, seed=seed, sample_offset=index)
    count = min(batch_size, len(images))
    result = explainer(images[:count], keys[:count])
    noisy = images[:count] + relative_sigma(images[:count], noise)[:, None, None, None] * \
        engine_noise(keys[:count], seed, index, images.shape[1:])
    rebuilt, _ = probe.gradients(noisy, result.targets)
    return float(np.abs(rebuilt - result.maps).max() / max(np.abs(result.maps).max(), 1e-30))


def noisy_copy_diagnostics(probe: Probe, images, keys, masks, targets, labels, sigmas, copies: int, seed: int,
                           class_names) -> list[dict]:
    """Per σ: what the model and its gradient do on the engine's noisy copies."""
    clean_maps, clean_scores = probe.gradients(images, targets)
    clean_inside = (clean_maps * masks).sum(axis=(1, 2))
    clean_outside = (clean_maps * ~masks).sum(axis=(1, 2))
    rows = []
    clean_evidence = probe.evidence_on_object(images, targets, masks)
    count = len(images)
    index = np.arange(count)
    for sigma in [0.0] + list(sigmas):
        started = time.perf_counter()
        scale = relative_sigma(images, sigma)[:, None, None, None]
        agree, correct, predicted, target_logit, share, hit, inside, outside, evidence = ([] for _ in range(9))
        for copy in range(copies if sigma > 0 else 1):
            noisy = images + scale * engine_noise(keys, seed, copy, images.shape[1:]) if sigma > 0 else images
            maps, scores = probe.gradients(noisy, targets)
            top = scores.argmax(axis=1)
            agree.append(top == targets)
            correct.append(top == labels)
            predicted.append(top)
            target_logit.append(scores[index, targets])
            magnitude = maps.astype(np.float64)
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
        predicted = np.concatenate(predicted)
        counts = np.bincount(predicted, minlength=len(class_names))
        row = {
            "sigma_rel": sigma,
            "sigma_abs_mean": round(float(scale.mean()), 4),
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
        print(f"  diag σ={sigma:g}: top-1 kept {row['top1_agrees_with_clean_target']:.3f}, "
              f"copy mass {row['copy_mass_in_mask']:.3f}, evidence on object {row.get('evidence_on_object')}",
              flush=True)
    return rows


# --------------------------------------------------------------------------
# Control: the same model fine-tuned with input noise
# --------------------------------------------------------------------------


def noise_tuned_copy(model_path: str, data_dir: str, epochs: int, max_noise: float, seed: int,
                     eval_images, eval_labels):
    """A copy of the demo model fine-tuned on the train split with Gaussian input noise.

    Each training image gets noise of a σ drawn uniformly in [0, ``max_noise``]
    (input units). Adam 1e-3 with cosine decay, batch 32. Kept in memory only.
    """
    keras.utils.set_random_seed(seed)
    train = demo.load_split(data_dir, "train")
    model = keras.saving.load_model(model_path, safe_mode=True)

    def add_noise(batch, label):
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


# --------------------------------------------------------------------------
# Example grid
# --------------------------------------------------------------------------


def _colour_map(saliency: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """|map| scaled to its 99th percentile, black-red-yellow; the object's outline dotted in cyan just outside it."""
    magnitude = np.abs(saliency)
    scale = np.percentile(magnitude, 99) or 1.0
    value = np.clip(magnitude / scale, 0, 1)
    rgb = np.stack([np.clip(2 * value, 0, 1), np.clip(2 * value - 1, 0, 1), np.zeros_like(value)], axis=-1)
    rows, cols = np.indices(mask.shape)
    outline = dilate(mask[None], 1)[0] & ~mask & ((rows + cols) % 2 == 0)
    rgb[outline] = (0.0, 0.9, 0.9)
    return (rgb * 255).astype(np.uint8)


def save_examples(path: str, images_uint8, masks, columns: list[tuple[str, np.ndarray]], zoom: int = 3) -> None:
    """Rows = images; columns = image, mask, then each (title, maps [B, H, W])."""
    count, height, width = masks.shape
    pad, title_height = 4, 14
    panels = ["image", "mask"] + [title for title, _ in columns]
    cell_w, cell_h = width * zoom + pad, height * zoom + pad
    canvas = np.full((title_height + count * cell_h, len(panels) * cell_w, 3), 255, np.uint8)
    for row in range(count):
        tiles = [images_uint8[row], np.repeat((masks[row] * 255).astype(np.uint8)[..., None], 3, axis=-1)]
        tiles += [_colour_map(maps[row], masks[row]) for _, maps in columns]
        for col, tile in enumerate(tiles):
            big = np.repeat(np.repeat(tile, zoom, axis=0), zoom, axis=1)
            top, left = title_height + row * cell_h, col * cell_w
            canvas[top:top + height * zoom, left:left + width * zoom] = big
    try:
        from PIL import Image, ImageDraw  # optional: titles only
        picture = Image.fromarray(canvas)
        draw = ImageDraw.Draw(picture)
        for col, title in enumerate(panels):
            draw.text((col * cell_w + 2, 1), title.replace("σ", "sigma"), fill=(0, 0, 0))
        picture.save(path)
    except ImportError:
        tf.io.write_file(path, tf.io.encode_png(canvas))


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _ci(cell: dict, digits: int = 3) -> str:
    low, high = cell["ci95"]
    return f"{cell['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _delta(cell: dict | None) -> str:
    if cell is None:
        return "—"
    low, high = cell["ci95"]
    return f"{cell['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


def markdown(report: dict) -> str:
    chance = report["chance"]
    lines = [f"Chance level (mean object area share): **{chance:.4f}** over {report['images']} images "
             f"(object dilated by 2 px: {report['dilated_chance']['2']:.4f}, the chance of 'peak ≤2 px').", ""]
    lines += ["| configuration | σ abs (mean) | mass in mask [95% CI] | ×chance | Δ mass vs gradient [95% CI] "
              "| pointing [95% CI] | ×chance | Δ pointing vs gradient | peak ≤2 px from object | s (ms/img) |",
              "|---|---:|---|---:|---|---|---:|---|---:|---:|"]
    for row in report["configs"]:
        lines.append(f"| {row['config']} | {row['sigma_abs_mean']:.3f} | {_ci(row['mass'])} | "
                     f"{row['mass_over_chance']:.1f} | {_delta(row.get('mass_minus_gradient'))} | "
                     f"{_ci(row['pointing'], 2)} | {row['pointing_over_chance']:.1f} | "
                     f"{_delta(row.get('pointing_minus_gradient'))} | {row['pointing_dilated_2']['mean']:.2f} | "
                     f"{row['seconds']:.1f} ({row['ms_per_image']:.0f}) |")
    lines += ["", "Where the mass goes (share of |map| mass; cumulative dilations, then disjoint rings):", ""]
    dil = report["dilated_chance"]
    head = ["configuration", "tight", "+1 px", "+2 px", "+4 px"] + list(REGIONS) + ["top 5% px"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines.append("| *area (chance)* | " + f"{chance:.3f} | " + " | ".join(f"{dil[str(r)]:.3f}" for r in DILATIONS)
                 + " | " + " | ".join(f"{report['region_area'][name]:.3f}" for name in REGIONS) + " | 0.050 |")
    for row in report["configs"]:
        if row["name"] in ("gradient", "SmoothGrad") and (row["samples"] in (1, 50) or row["noise"] < 0.05) \
                and row["noise_mode"] == "relative" or row["name"] in ("signed mean", "VarGrad", "SmoothGrad²"):
            cells = [row["mass"]["mean"]] + [row[f"mass_dilated_{r}"]["mean"] for r in DILATIONS]
            cells += [row[f"region {name}"]["mean"] for name in REGIONS] + [row["top5pct_mass"]["mean"]]
            lines.append(f"| {row['config']} | " + " | ".join(f"{value:.3f}" for value in cells) + " |")
    for title, key in (("Noisy copies, demo model", "diagnostics"), ("Noisy copies, noise-tuned control model",
                                                                    "control_diagnostics")):
        if not report.get(key):
            continue
        lines += ["", f"{title} ({report[key][-1]['copies_per_image']} copies per image, the engine's noise):", "",
                  "| σ rel | σ abs | top-1 = clean target | most predicted class (share) | target logit "
                  "| GMP evidence on object (chance) | copy mass in mask (agreeing / not) | pooled = SG mass "
                  "| copy pointing | inside / outside mass vs clean |",
                  "|---:|---:|---:|---|---:|---|---|---:|---:|---|"]
        for row in report[key]:
            evidence = (f"{row['evidence_on_object']:.3f} ({row['evidence_chance']:.3f})"
                        if "evidence_on_object" in row else "—")
            split = " / ".join("—" if row[name] is None else f"{row[name]:.3f}"
                               for name in ("copy_mass_in_mask_if_agrees", "copy_mass_in_mask_if_not"))
            lines.append(f"| {row['sigma_rel']:g} | {row['sigma_abs_mean']:.3f} | "
                         f"{row['top1_agrees_with_clean_target']:.3f} | {row['most_predicted_class']} "
                         f"({row['most_predicted_share']:.2f}) | {row['target_logit_mean']:.2f} | {evidence} | "
                         f"{row['copy_mass_in_mask']:.3f} ({split}) | {row['pooled_mass_in_mask']:.3f} | "
                         f"{row['copy_pointing']:.3f} | {row['inside_mass_vs_clean_median']:.2f} / "
                         f"{row['outside_mass_vs_clean_median']:.2f} |")
    if report.get("control_configs"):
        control = report["control"]
        lines += ["", f"Control model (demo model fine-tuned {control['epochs']} epochs with input noise "
                      f"σ ~ U(0, {control['max_noise_abs']}); clean test accuracy {control['clean_accuracy']:.3f}):",
                  "", "| configuration | mass in mask [95% CI] | Δ mass vs its gradient | pointing [95% CI] "
                      "| Δ pointing vs its gradient | mass +2 px | peak ≤2 px |", "|---|---|---|---|---|---:|---:|"]
        for row in report["control_configs"]:
            lines.append(f"| {row['config']} | {_ci(row['mass'])} | {_delta(row.get('mass_minus_gradient'))} | "
                         f"{_ci(row['pointing'], 2)} | {_delta(row.get('pointing_minus_gradient'))} | "
                         f"{row['mass_dilated_2']['mean']:.3f} | {row['pointing_dilated_2']['mean']:.2f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def evaluate(model, configs, images, keys, masks, dilated, regions, resamples, chance, args, tag: str) -> tuple:
    rows, maps_by_config, baseline = [], {}, None
    for config in configs:
        result, seconds, explainer = run_config(model, config, images, keys, args.batch_size, args.jit, args.seed)
        figures = map_figures(result.maps, masks, dilated, regions)
        if config.name == "gradient":
            baseline = figures
        row = summarise(config, figures, resamples, baseline if config.name != "gradient" else None, seconds,
                        len(images), float(np.mean(result.noise_sigma)), chance)
        row["jit_used"] = explainer.jit_used
        rows.append(row)
        maps_by_config[config] = result.maps
        print(f"[{tag}] {row['config']:<40} mass {row['mass']['mean']:.3f}  pointing {row['pointing']['mean']:.3f}"
              f"  {seconds:.1f}s", flush=True)
    return rows, maps_by_config


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="demo_data",
                        help="demo folder (make it with `python -m pipelines.demo --out demo_data`)")
    parser.add_argument("--split", default="test", help="held-out split to score")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images (None: the whole split)")
    parser.add_argument("--samples", default="10,20,50", help="SmoothGrad N grid")
    parser.add_argument("--sigmas", default="0.05,0.1,0.15,0.2,0.3", help="relative σ grid")
    parser.add_argument("--small-sigmas", default="0.01,0.02",
                        help="extra small relative σ, SmoothGrad at --variant-samples only")
    parser.add_argument("--variant-samples", type=int, default=20, help="N for SmoothGrad², VarGrad, signed, G×I")
    parser.add_argument("--variant-sigmas", default="0.05,0.1,0.15", help="relative σ for the variants")
    parser.add_argument("--diag-copies", type=int, default=20, help="noisy copies per image for the diagnostics")
    parser.add_argument("--seed", type=int, default=0, help="noise, bootstrap and fine-tuning seed")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--jit", default="graph", choices=engine.JIT_MODES,
                        help="engine jit mode (XLA was ~5x slower than graph for this small CNN on CPU)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--control-epochs", type=int, default=4,
                        help="epochs of noise fine-tuning for the control model (0: skip the control)")
    parser.add_argument("--control-noise", type=float, default=0.45,
                        help="largest absolute input-noise σ used in the control's fine-tuning")
    parser.add_argument("--examples", default=None, help="save a PNG grid of example maps here")
    parser.add_argument("--out", default=None, help="write the full report as JSON here")
    parser.add_argument("--markdown", default=None, help="write the tables as Markdown here")
    args = parser.parse_args(argv)

    started_run = time.perf_counter()
    model_path = os.path.join(args.data, demo.MODEL_FILENAME)
    if not os.path.isfile(model_path):
        parser.error(f"no {demo.MODEL_FILENAME} in {args.data!r}; make the demo folder with "
                     f"`python -m pipelines.demo --out {args.data}`.")
    card_path = os.path.join(args.data, demo.CARD_FILENAME)
    card = json.load(open(card_path, encoding="utf-8")) if os.path.isfile(card_path) else {}
    data = demo.load_split(args.data, args.split)
    stop = args.limit or len(data["label"])
    images_uint8, masks = data["image"][:stop], data["mask"][:stop]
    labels = data["label"][:stop]
    keys = [key.decode() if isinstance(key, bytes) else str(key) for key in data["id"][:stop]]
    images = demo.preprocess(images_uint8)
    model = keras.saving.load_model(model_path, safe_mode=True)

    dilated = {radius: dilate(masks, radius) for radius in DILATIONS}
    regions = region_masks(masks)
    chance = float(masks.mean())
    resamples = bootstrap_indices(len(images), args.bootstrap, args.seed)
    samples, sigmas, small = _ints(args.samples), _floats(args.sigmas), _floats(args.small_sigmas)
    variant_sigmas = _floats(args.variant_sigmas)
    probe = Probe(model)
    clean_scores = probe.gradients(images, labels)[1]
    clean_top1 = clean_scores.argmax(axis=1)
    report = {
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "tensorflow": tf.__version__, "keras": keras.__version__},
        "data": args.data, "split": args.split, "images": len(images),
        "demo_card": {key: card.get(key) for key in ("test_accuracy", "object_area_share", "train_count",
                                                     "test_count", "model")},
        "clean_accuracy_scored_images": round(float((clean_top1 == labels).mean()), 4),
        "chance": round(chance, 4),
        "chance_per_image_mean": round(float(masks.mean(axis=(1, 2)).mean()), 4),
        "dilated_chance": {str(radius): round(float(grown.mean()), 4) for radius, grown in dilated.items()},
        "region_area": {name: round(float(region.mean()), 4) for name, region in regions.items()},
        "settings": {key: value for key, value in vars(args).items()},
    }
    print(f"{len(images)} images, clean accuracy {report['clean_accuracy_scored_images']:.3f}, "
          f"chance {chance:.4f}", flush=True)

    report["noise_reconstruction_max_rel_diff"] = check_noise_reconstruction(
        model, probe, images, keys, args.seed, args.batch_size, args.jit)
    print(f"noise rebuilt from the engine's generator: max relative difference "
          f"{report['noise_reconstruction_max_rel_diff']:.2e}", flush=True)

    configs = main_configs(samples, sigmas, small, args.variant_samples, variant_sigmas)
    report["configs"], maps = evaluate(model, configs, images, keys, masks, dilated, regions, resamples, chance,
                                       args, "demo")
    diag_sigmas = sorted(set(small + sigmas))
    report["diagnostics"] = noisy_copy_diagnostics(probe, images, keys, masks, clean_top1, labels, diag_sigmas,
                                                   args.diag_copies, args.seed, list(demo.CLASS_NAMES))

    control_maps = {}
    if args.control_epochs > 0:
        control_model, report["control"] = noise_tuned_copy(model_path, args.data, args.control_epochs,
                                                            args.control_noise, args.seed, images, labels)
        print(f"control model: {report['control']}", flush=True)
        control_configs = [Config("gradient")]
        control_configs += [Config("SmoothGrad", samples=args.variant_samples, noise=s) for s in diag_sigmas]
        control_configs += [Config("signed mean", variant="signed", samples=args.variant_samples, noise=s)
                            for s in variant_sigmas]
        control_configs += [Config("VarGrad", variant="vargrad", samples=args.variant_samples, noise=s)
                            for s in variant_sigmas]
        report["control_configs"], control_maps = evaluate(control_model, control_configs, images, keys, masks,
                                                           dilated, regions, resamples, chance, args, "control")
        control_probe = Probe(control_model)
        control_top1 = control_probe.gradients(images, labels)[1].argmax(axis=1)
        report["control_diagnostics"] = noisy_copy_diagnostics(
            control_probe, images, keys, masks, control_top1, labels, diag_sigmas, args.diag_copies, args.seed,
            list(demo.CLASS_NAMES))

    if args.examples:
        chosen = np.flatnonzero(clean_top1 == labels)[:8]
        wanted = [("gradient", Config("gradient"))]
        wanted += [(f"SG σ={s:g}", Config("SmoothGrad", samples=max(samples), noise=s)) for s in (0.05, 0.1, 0.2)]
        wanted += [(f"SG σ={s:g} N={args.variant_samples}", Config("SmoothGrad", samples=args.variant_samples,
                                                                    noise=s)) for s in small[-1:]]
        wanted += [(f"VarGrad σ={s:g}", Config("VarGrad", variant="vargrad", samples=args.variant_samples, noise=s))
                   for s in variant_sigmas[:1]]
        columns = [(title, maps[config][chosen]) for title, config in wanted if config in maps]
        columns += [(f"tuned: {title}", control_maps[config][chosen]) for title, config in
                    (("gradient", Config("gradient")),
                     ("SG σ=0.1", Config("SmoothGrad", samples=args.variant_samples, noise=0.1)),
                     ("SG σ=0.2", Config("SmoothGrad", samples=args.variant_samples, noise=0.2)))
                    if config in control_maps]
        save_examples(args.examples, images_uint8[chosen], masks[chosen], columns)
        report["examples"] = {"path": args.examples, "keys": [keys[i] for i in chosen],
                              "columns": ["image", "mask"] + [title for title, _ in columns]}

    report["total_seconds"] = round(time.perf_counter() - started_run, 1)
    text = markdown(report)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
