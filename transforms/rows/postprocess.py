"""Post-processing of raw saliency maps: down-sampling, normalisation, quality figures."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from transforms.engine.options import bad_option


@dataclasses.dataclass(frozen=True)
class Normalization:
    """A parsed map normalisation: ``none``, ``minmax``, ``abs_minmax`` or ``percentile:P``.

    Attributes:
        kind: ``none``, ``minmax``, ``abs_minmax`` or ``percentile``.
        percent: P for ``percentile`` (0 < P <= 100), else None.

    Example:
        >>> Normalization.parse("percentile:99")
        Normalization(kind='percentile', percent=99.0)
    """

    kind: str = "none"
    percent: float | None = None

    @classmethod
    def parse(cls, text) -> "Normalization":
        """Parses the option's text; raises ``ValueError`` (one line) when it is not one of the forms."""
        if isinstance(text, Normalization):
            return text
        if text in ("none", "minmax", "abs_minmax"):
            return cls(text)
        match = re.fullmatch(r"percentile:(\d+(?:\.\d*)?)", text if isinstance(text, str) else "")
        if match and 0 < float(match.group(1)) <= 100:
            return cls("percentile", float(match.group(1)))
        raise bad_option("normalize", "none, minmax, abs_minmax or percentile:P with 0 < P <= 100", text)

    def __str__(self) -> str:
        if self.kind != "percentile":
            return self.kind
        return f"percentile:{self.percent:g}"

    def __call__(self, saliency: np.ndarray) -> np.ndarray:
        """Normalises one map; a constant map becomes all zeros.

        ``minmax``: (s − min)/(max − min); ``abs_minmax``: the same on |s|;
        ``percentile:P``: |s| divided by its P-th percentile, clipped to [0, 1].
        """
        if self.kind == "none":
            return saliency
        values = np.abs(saliency) if self.kind in ("abs_minmax", "percentile") else saliency
        if self.kind == "percentile":
            scale = float(np.percentile(values, self.percent))
            return np.clip(values / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(values)
        low, high = float(values.min()), float(values.max())
        return (values - low) / (high - low) if high > low else np.zeros_like(values)


def parse_normalize(text: str) -> tuple[str, float | None]:
    """Parses ``none``, ``minmax``, ``abs_minmax`` or ``percentile:P``; returns ``(kind, P or None)``."""
    parsed = Normalization.parse(text)
    return parsed.kind, parsed.percent


def downsampled_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """The size of a ``height`` × ``width`` map average-pooled by ``factor``.

    Raises:
        ValueError: when the factor is larger than the map.
    """
    if height // factor == 0 or width // factor == 0:
        raise bad_option("downsample", f"a factor no larger than the {height}x{width} map", factor)
    return height // factor, width // factor


def downsample(saliency: np.ndarray, factor: int) -> np.ndarray:
    """Average-pools one map ``[H, W]`` or ``[H, W, C]`` by an integer factor.

    Rows and columns that do not fill a whole block are dropped (floor division).
    """
    if factor == 1:
        return saliency
    height, width = downsampled_size(saliency.shape[0], saliency.shape[1], factor)
    cropped = saliency[:height * factor, :width * factor]
    blocks = cropped.reshape((height, factor, width, factor) + saliency.shape[2:])
    return blocks.mean(axis=(1, 3))


def normalize(saliency: np.ndarray, method) -> np.ndarray:
    """Normalises one map by ``method`` (a :class:`Normalization` or its text)."""
    return Normalization.parse(method)(saliency)


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
