"""Maps at the audit's resolution: unit mass, area-pooled, and where their cells lie in the input.

Every map the audit looks at is first made comparable: absolute values (summed
over channels for ``reduce: none``), sum-pooled by an integer factor so that its
longer side is at most :data:`AUDIT_MAX_SIDE` cells (aspect kept; the last row
and column of cells may cover fewer pixels), then scaled to unit mass. A map
whose mass is zero or not finite stays all zeros (and counts as such).

Example:
>>> factor = pooling_factor((224, 224))        # 4: 56 x 56 cells
>>> pooled = unit_mass_pooled(np.ones((224, 224), np.float32), factor)
>>> pooled.shape, float(pooled.sum())
((56, 56), 1.0)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

#: The longest side of an audit map, in cells.
AUDIT_MAX_SIDE = 64
#: The run folder's sub-folder holding the audit's inputs.
AUDIT_DIR = "_audit"
#: The groups of class saliency: every map of a class, and, where the record has a label, by correctness.
GROUPS = ("all", "correct", "wrong")


def pooling_factor(map_shape, max_side: int = AUDIT_MAX_SIDE) -> int:
    """The integer sum-pooling factor that brings a stored map's longer side to at most ``max_side``."""
    return max(1, math.ceil(max(int(map_shape[0]), int(map_shape[1])) / max_side))


def pooled_shape(map_shape, factor: int) -> tuple[int, int]:
    """The audit map's (rows, columns) for a stored map of ``map_shape`` pooled by ``factor``."""
    return math.ceil(int(map_shape[0]) / factor), math.ceil(int(map_shape[1]) / factor)


def unit_mass_pooled(saliency: np.ndarray, factor: int) -> np.ndarray:
    """``|saliency|`` (channels summed), sum-pooled by ``factor``, scaled to mass 1; float32 ``[h, w]``."""
    magnitude = np.abs(np.asarray(saliency, np.float64))
    if magnitude.ndim == 3:
        magnitude = magnitude.sum(axis=-1)
    height, width = magnitude.shape
    rows, columns = pooled_shape(magnitude.shape, factor)
    padded = np.zeros((rows * factor, columns * factor))
    padded[:height, :width] = magnitude
    pooled = padded.reshape(rows, factor, columns, factor).sum(axis=(1, 3))
    total = pooled.sum()
    if not np.isfinite(total) or total <= 0:
        return np.zeros((rows, columns), np.float32)
    return (pooled / total).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Grid:
    """How audit cells map to input pixels.

    Attributes:
        cells: (rows, columns) of an audit map.
        cell: input pixels per cell side (the pooling factor times the stored map's ``downsample``).
        input_shape: (H, W) of the model input.
    """

    cells: tuple
    cell: int
    input_shape: tuple

    def box_in_pixels(self, y0: int, x0: int, y1: int, x1: int) -> list[int]:
        """Cells ``[y0, y1) x [x0, x1)`` as ``[y0, x0, y1, x1]`` in input pixels (end exclusive, clipped)."""
        height, width = self.input_shape
        return [min(y0 * self.cell, height), min(x0 * self.cell, width),
                min(y1 * self.cell, height), min(x1 * self.cell, width)]


@dataclasses.dataclass(frozen=True)
class ClassSaliency:
    """The mean and spread of one class's unit-mass audit maps.

    Attributes:
        target: the explained class.
        group: one of :data:`GROUPS`.
        count: maps aggregated.
        mean, std: float64 ``[rows, columns]``: per cell, the mean and the
            (population) standard deviation over the maps.
    """

    target: int
    group: str
    count: int
    mean: np.ndarray
    std: np.ndarray


@dataclasses.dataclass(frozen=True)
class SampledMap:
    """One map of a class's bounded sample (the records with the smallest key hashes).

    Attributes:
        target: the explained class.
        key, source_file, record_index: the record, where it can be read again.
        label: its label, or None.
        predicted: the clean top-1 class.
        score: the pre-softmax score of ``target``.
        target_rank: the target's rank among the scores (0 for the top class).
        pooled: float32 ``[rows, columns]``, unit mass (:func:`unit_mass_pooled`).
    """

    target: int
    key: str
    source_file: str
    record_index: int
    label: int | None
    predicted: int
    score: float
    target_rank: int
    pooled: np.ndarray
