"""Per-map statistics for audits, computed from the full-resolution map.

Each statistic is a column of the corpus, so an audit can find, without
loading any map, the images whose saliency sits on the border, is spread
everywhere or peaks far from the object. All of them use the map's magnitude
``|s|`` (summed over channels when channels are kept) normalised to a
distribution ``p`` over the ``H × W`` pixels; a map with no mass gets None.

* ``entropy``: ``-Σ p log p / log(H·W)``, in [0, 1]; 1 = uniform, 0 = one pixel.
* ``gini``: the Gini coefficient of the pixel masses, in [0, 1); 0 = uniform,
  near 1 = all mass on few pixels.
* ``com_y``, ``com_x``: the centre of mass, in [0, 1] image coordinates
  (pixel centres at ``(i + 0.5) / H``).
* ``peak_y``, ``peak_x``: the location of the largest value, same coordinates
  (the first one in row-major order on ties).
* ``border_mass``: the share of the mass in the outer frame of the image whose
  width is 10 % of each side (at least one pixel).

Example:

>>> map_statistics(np.ones((10, 10)))["entropy"]
1.0
"""

from __future__ import annotations

import math

import numpy as np

#: The statistics columns, in schema order.
STATISTICS = ("entropy", "gini", "com_y", "com_x", "peak_y", "peak_x", "border_mass")
#: The width of the border frame, as a share of each side.
BORDER_SHARE = 0.10


def border_frame(height: int, width: int) -> np.ndarray:
    """Boolean ``[H, W]`` mask of the outer frame: ``BORDER_SHARE`` of each side, at least one pixel."""
    rows = max(1, int(round(BORDER_SHARE * height)))
    cols = max(1, int(round(BORDER_SHARE * width)))
    frame = np.ones((height, width), bool)
    frame[rows:height - rows, cols:width - cols] = False
    return frame


def map_statistics(saliency: np.ndarray) -> dict:
    """The :data:`STATISTICS` of one map ``[H, W]`` or ``[H, W, C]``.

    Args:
        saliency: the raw map (any sign; its magnitude is used).

    Returns:
        ``{name: float or None}``; all None for a map with no mass or non-finite values.
    """
    magnitude = np.abs(np.asarray(saliency, np.float64))
    if magnitude.ndim == 3:
        magnitude = magnitude.sum(axis=-1)
    total = float(magnitude.sum())
    if not math.isfinite(total) or total <= 0:
        return dict.fromkeys(STATISTICS)
    height, width = magnitude.shape
    share = magnitude / total
    flat = share.ravel()
    positive = flat[flat > 0]
    entropy = float(-(positive * np.log(positive)).sum() / math.log(flat.size)) if flat.size > 1 else 0.0
    ordered = np.sort(flat)
    ranks = np.arange(1, flat.size + 1)
    gini = float(((2 * ranks - flat.size - 1) * ordered).sum() / flat.size)
    rows = (np.arange(height) + 0.5) / height
    cols = (np.arange(width) + 0.5) / width
    peak_row, peak_col = np.unravel_index(int(np.argmax(magnitude)), magnitude.shape)
    figures = {
        "entropy": entropy,
        "gini": gini,
        "com_y": float(share.sum(axis=1) @ rows),
        "com_x": float(share.sum(axis=0) @ cols),
        "peak_y": float(rows[peak_row]),
        "peak_x": float(cols[peak_col]),
        "border_mass": float(share[border_frame(height, width)].sum()),
    }
    return {name: min(max(value, 0.0), 1.0) for name, value in figures.items()}  # rounding stays in range
