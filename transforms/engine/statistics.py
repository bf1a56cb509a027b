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

One more column comes from the engine, not from the finished map:
``reliability``, the Spearman rank correlation between the map of the
even-numbered noisy samples and the map of the odd-numbered ones (both
accumulated in the same compiled step as the full map, which stays the mean
over all N). Near 1: N was enough for this image; low: its map has not settled.
None when N < 2 or a half-map is constant.

Example:

>>> map_statistics(np.ones((10, 10)))["entropy"]
1.0
"""

from __future__ import annotations

import math

import numpy as np

#: The statistics columns, in schema order.
STATISTICS = ("entropy", "gini", "com_y", "com_x", "peak_y", "peak_x", "border_mass")
#: Every per-map column of the corpus: the statistics, then the engine's split-half reliability.
MAP_COLUMNS = STATISTICS + ("reliability",)
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


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks ``0 .. n-1`` of a 1-D array, tied values sharing the mean of their ranks.

    Example:
        >>> average_ranks(np.array([3.0, 1.0, 3.0]))
        array([1.5, 0. , 1.5])
    """
    values = np.asarray(values)
    size = values.size
    order = np.argsort(values)  # ties get their average rank below, so their order does not matter
    ordered = values[order]
    starts_group = np.empty(size, bool)
    starts_group[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_group[1:])
    ranks = np.empty(size)
    if starts_group.all():  # no ties (most maps): the ranks are the sorting order inverted
        ranks[order] = np.arange(size, dtype=np.float64)
        return ranks
    starts = np.flatnonzero(starts_group)
    counts = np.diff(starts, append=size)
    ranks[order] = np.repeat(starts + (counts - 1) / 2.0, counts)
    return ranks


def _ranks_correlation(ranks_a: np.ndarray, ranks_b: np.ndarray) -> float:
    """Pearson correlation of two rank vectors of ``0 .. n-1`` (their mean is (n - 1) / 2), clipped to [-1, 1]."""
    middle = (ranks_a.size - 1) / 2.0
    centred_a, centred_b = ranks_a - middle, ranks_b - middle
    value = float(centred_a @ centred_b / np.sqrt((centred_a @ centred_a) * (centred_b @ centred_b)))
    return min(1.0, max(-1.0, value))


def _rankable(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two flat maps of one size can be ranked against each other (neither is constant)."""
    if a.size != b.size:
        raise ValueError(f"maps differ in size: {a.size} and {b.size} values.")
    return a.size >= 2 and a.min() != a.max() and b.min() != b.max()


def rank_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation of two maps of the same size (ties get average ranks).

    Returns:
        A float in [-1, 1]; NaN when either map is constant (no ranking to compare).

    Raises:
        ValueError: when the maps differ in size.

    Example:
        >>> rank_correlation(np.arange(5.0), np.arange(5.0) ** 3)
        1.0
    """
    a, b = np.ravel(first), np.ravel(second)
    if not _rankable(a, b):
        return float("nan")
    return _ranks_correlation(average_ranks(a), average_ranks(b))


def split_half_reliability(even: np.ndarray, odd: np.ndarray) -> np.ndarray:
    """Rank correlation of each pair of half-maps ``[B, K, ...]`` → float32 ``[B, K]`` (NaN if constant)."""
    values = [[rank_correlation(a, b) for a, b in zip(even_maps, odd_maps)] for even_maps, odd_maps in zip(even, odd)]
    return np.asarray(values, np.float32).reshape(even.shape[:2])


def tie_order(size: int, stream: int) -> np.ndarray:
    """A fixed pseudo-random order of ``size`` positions (``uint64`` keys), one per ``stream``, to break rank ties.

    A SplitMix64 hash of (stream, position): the same on every machine and
    run, with no random state. Two streams give unrelated orders.

    Example:
        >>> tie_order(4, 0).argsort().tolist() == tie_order(4, 0).argsort().tolist()
        True
    """
    with np.errstate(over="ignore"):
        z = np.arange(size, dtype=np.uint64) + np.uint64(stream + 1) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def tie_broken_ranks(values: np.ndarray, stream: int) -> np.ndarray:
    """Ranks ``0 .. n-1`` of a 1-D array, ties broken in the fixed order of :func:`tie_order` (``stream``)."""
    values = np.asarray(values)
    ranks = np.empty(values.size)
    ranks[np.lexsort((tie_order(values.size, stream), values))] = np.arange(values.size)
    return ranks


def stopping_correlation(even: np.ndarray, odd: np.ndarray) -> float:
    """The split-half r that ``samples: auto`` stops on: Spearman with every tie broken in a fixed order.

    Pixels that no noisy sample reached are zero in both half-maps. With
    average ranks (:func:`rank_correlation`) they tie in the same places and
    count as perfect agreement, though the converged map ranks them: on a
    sparse map (a global-max-pooling head) that made the estimate optimistic.
    Here the ties of each half are broken in its own fixed pseudo-random order
    (:func:`tie_order`, streams 0 and 1), so a block of zeros agrees with
    nothing. Maps without ties get exactly :func:`rank_correlation`'s value.

    Returns:
        A float in [-1, 1]; NaN when either half-map is constant.

    Example:
        >>> half = np.r_[np.zeros(50), np.arange(50.0)]  # half of the pixels unreached
        >>> round(rank_correlation(half, half), 2), round(stopping_correlation(half, half), 2)
        (1.0, 0.86)
    """
    a, b = np.ravel(even), np.ravel(odd)
    if not _rankable(a, b):
        return float("nan")
    return _ranks_correlation(tie_broken_ranks(a, 0), tie_broken_ranks(b, 1))


def stopping_reliability(even: np.ndarray, odd: np.ndarray) -> np.ndarray:
    """:func:`stopping_correlation` of each pair of half-maps ``[B, K, ...]`` → float32 ``[B, K]``."""
    values = [[stopping_correlation(a, b) for a, b in zip(even_maps, odd_maps)]
              for even_maps, odd_maps in zip(even, odd)]
    return np.asarray(values, np.float32).reshape(even.shape[:2])
