"""Figures of explanation quality against an object mask: regions, per-image figures, bootstrap intervals.

A map is scored by the two figures the pipeline stores in its corpus columns
(:func:`transforms.rows.postprocess.mask_figures`):

* **mass in mask**: the share of the map's |mass| that falls on the object;
* **pointing**: whether the map's largest |value| lies on the object.

The chance level of both is the object's area share. To tell blur over the
object's edge from mass moving to the background, the same figures are taken
on the object dilated by a few pixels and on rings of pixels around it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from transforms.rows.postprocess import mask_figures

DILATIONS = (1, 2, 4)
# Rings of pixels, from the object's inside out (8-neighbour distance to the object's edge).
REGIONS = ("interior", "border", "ring 1", "ring 2", "ring 3-4", "far")


def dilate(masks: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``bool [B, H, W]`` masks by a 3x3 square, ``radius`` times.

    Args:
        masks: boolean masks, ``[B, H, W]``.
        radius: number of 3x3 dilations (0 returns a copy).

    Returns:
        The grown masks, same shape; pixels outside the image count as empty.
    """
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
    """Binary erosion of ``bool [B, H, W]`` masks: the complement of the dilated complement."""
    return ~dilate(~masks, radius)


def region_masks(masks: np.ndarray) -> dict[str, np.ndarray]:
    """Disjoint regions around each object, keyed by the names in :data:`REGIONS`.

    The object's interior and its 1-px border, then the rings 1, 2 and 3-4 px
    outside it, then the far background. Together they cover every pixel once.

    Args:
        masks: object masks, ``bool [B, H, W]``.

    Returns:
        ``{name: bool [B, H, W]}`` in the order of :data:`REGIONS`.
    """
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
    """Per-image quality figures of a batch of maps.

    Args:
        maps: saliency maps ``[B, H, W]`` (or ``[B, H, W, C]``, summed over channels as |values|).
        masks: object masks, ``bool [B, H, W]``.
        dilated: ``{radius: dilated masks}``, e.g. ``{r: dilate(masks, r) for r in DILATIONS}``.
        regions: :func:`region_masks` of ``masks``.

    Returns:
        ``float64 [B]`` arrays: ``mass`` and ``pointing`` (the pipeline's own
        figures), ``mass_dilated_R`` and ``pointing_dilated_R`` per radius,
        ``region NAME`` per region and ``top5pct_mass`` (the share of mass on
        the map's top 5 % pixels: how peaked it is). NaN where a map has no mass.
    """
    magnitude = np.abs(maps.astype(np.float64))
    if magnitude.ndim == 4:
        magnitude = magnitude.sum(axis=-1)
    total = magnitude.sum(axis=(1, 2))
    mass, hit = np.full(len(maps), np.nan), np.full(len(maps), np.nan)
    for index, (saliency, mask) in enumerate(zip(maps, masks)):
        inside, peak_inside = mask_figures(saliency, mask)
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
        flat = np.sort(magnitude.reshape(len(maps), -1), axis=1)[:, ::-1]
        figures["top5pct_mass"] = flat[:, :max(1, flat.shape[1] // 20)].sum(axis=1) / total
    return figures


def bootstrap_indices(count: int, resamples: int, seed: int) -> np.ndarray:
    """Image indices of ``resamples`` bootstrap resamples of ``count`` images, ``int [resamples, count]``.

    Drawn once and shared by every figure, so paired differences use the same resamples.
    """
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def mean_ci(values: np.ndarray, resamples: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95 % percentile-bootstrap interval over images (NaNs ignored).

    Args:
        values: one figure per image, ``[B]``.
        resamples: :func:`bootstrap_indices` for ``B`` images.

    Returns:
        ``(mean, low, high)``; all NaN when every value is NaN.
    """
    values = np.asarray(values, np.float64)
    if np.isnan(values).all():
        return math.nan, math.nan, math.nan
    draws = np.nanmean(values[resamples], axis=1)
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return float(np.nanmean(values)), float(low), float(high)


@dataclasses.dataclass(frozen=True)
class MaskScorer:
    """Everything needed to score maps of one fixed set of images against their object masks.

    Attributes:
        masks: object masks, ``bool [B, H, W]``.
        dilated: ``{radius: masks dilated by radius}`` for each of :data:`DILATIONS`.
        regions: :func:`region_masks` of ``masks``.
        resamples: :func:`bootstrap_indices` shared by every figure.
        chance: the mean object area share over all pixels (the chance level).
    """

    masks: np.ndarray
    dilated: dict[int, np.ndarray]
    regions: dict[str, np.ndarray]
    resamples: np.ndarray
    chance: float

    @classmethod
    def build(cls, masks: np.ndarray, bootstrap: int, seed: int) -> "MaskScorer":
        """Prepares the regions and ``bootstrap`` resamples (seeded by ``seed``) for ``masks``."""
        return cls(masks=masks, dilated={radius: dilate(masks, radius) for radius in DILATIONS},
                   regions=region_masks(masks), resamples=bootstrap_indices(len(masks), bootstrap, seed),
                   chance=float(masks.mean()))

    def figures(self, maps: np.ndarray) -> dict[str, np.ndarray]:
        """:func:`map_figures` of ``maps`` (one per image, in the masks' order)."""
        return map_figures(maps, self.masks, self.dilated, self.regions)

    def interval(self, values: np.ndarray) -> dict:
        """``{"mean": m, "ci95": [low, high]}`` of per-image ``values``, rounded to 4 digits."""
        mean, low, high = mean_ci(values, self.resamples)
        return {"mean": round(mean, 4), "ci95": [round(low, 4), round(high, 4)]}
