"""Post-processing of raw saliency maps: down-sampling, normalisation, quality figures."""

from __future__ import annotations

import re

import numpy as np


def parse_normalize(text: str) -> tuple[str, float | None]:
    """Parses ``none``, ``minmax``, ``abs_minmax`` or ``percentile:P`` (0 < P <= 100)."""
    if text in ("none", "minmax", "abs_minmax"):
        return text, None
    match = re.fullmatch(r"percentile:(\d+(?:\.\d*)?)", text or "")
    if match and 0 < float(match.group(1)) <= 100:
        return "percentile", float(match.group(1))
    raise ValueError(f"'normalize' must be none, minmax, abs_minmax or percentile:P with 0 < P <= 100; "
                     f"got {text!r}.")


def downsample(saliency: np.ndarray, factor: int) -> np.ndarray:
    """Average-pools one map ``[H, W]`` or ``[H, W, C]`` by an integer factor.

    Rows and columns that do not fill a whole block are dropped (floor division).
    """
    if factor == 1:
        return saliency
    height, width = saliency.shape[0] // factor, saliency.shape[1] // factor
    if height == 0 or width == 0:
        raise ValueError(f"downsample factor {factor} is larger than the map {saliency.shape[:2]}.")
    cropped = saliency[:height * factor, :width * factor]
    blocks = cropped.reshape((height, factor, width, factor) + saliency.shape[2:])
    return blocks.mean(axis=(1, 3))


def normalize(saliency: np.ndarray, method: str) -> np.ndarray:
    """Normalises one map; constant maps become all zeros.

    ``minmax``: (s − min)/(max − min); ``abs_minmax``: the same on |s|;
    ``percentile:P``: |s| divided by its P-th percentile, clipped to [0, 1].
    """
    kind, percent = parse_normalize(method)
    if kind == "none":
        return saliency
    values = np.abs(saliency) if kind in ("abs_minmax", "percentile") else saliency
    if kind == "percentile":
        scale = float(np.percentile(values, percent))
        return np.clip(values / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(values)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def mask_figures(saliency: np.ndarray, mask: np.ndarray) -> tuple[float | None, bool | None]:
    """Share of saliency mass inside ``mask`` and whether the map's maximum lies inside.

    Mass uses |saliency| summed over channels; both are None for an empty mask
    or a map with no mass.
    """
    magnitude = np.abs(saliency)
    if magnitude.ndim == 3:
        magnitude = magnitude.sum(axis=-1)
    mask = np.asarray(mask, bool)
    if magnitude.shape != mask.shape:
        raise ValueError(f"mask {mask.shape} and map {magnitude.shape} differ in size.")
    total = float(magnitude.sum(dtype=np.float64))
    if not mask.any() or total <= 0:
        return None, None
    inside = float(magnitude[mask].sum(dtype=np.float64)) / total
    peak = np.unravel_index(int(np.argmax(magnitude)), magnitude.shape)
    return inside, bool(mask[peak])
