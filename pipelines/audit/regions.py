"""Shortcut candidates: a compact region that carries a class's saliency, far more than other classes' maps put there.

The signature of a shortcut (a tag, a watermark, a ruler) in saliency maps is
many maps of one class putting their mass on the same small region, at the
same place, which the other classes' maps do not look at. Per class:

1. **Where.** For the class's mean map, and for the mean map of each of its
   strategy clusters (a shortcut used by part of the class shows sharper in
   its own cluster), every square box of up to ``max_side`` of the longer side
   is scored by its *excess*: the class's mean mass in the box minus the other
   classes' mean mass there. The smallest box reaching 90 % of the best
   excess is the candidate region of that mean.
2. **Who.** A map of the class is a *member* when its mass in the box is
   above the 99th percentile of the other classes' maps' mass in the same box
   (and at least twice the box's share of the area): the threshold comes from
   the data, not from a constant tuned to one dataset.
3. **How many.** The candidate with the largest member share is the class's;
   its member share is the check's measure.

Example:
>>> found = find_candidate(target, class_mean, others_mean, cluster_means, class_maps, class_keys, other_maps, grid)
>>> found.region, found.member_share
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: The longest side of a candidate box, as a share of the map's longer side.
MAX_BOX_SIDE = 0.25
#: A candidate region keeps this share of the best excess with the smallest box.
EXCESS_KEPT = 0.9
#: Members put more mass in the box than this quantile of the other classes' maps do.
OTHERS_QUANTILE = 0.99
#: ... and at least this many times the box's share of the area.
MIN_CONCENTRATION = 2.0
#: Cluster means considered besides the class mean: clusters of at least this share of the class.
MIN_CLUSTER_SHARE = 0.1
#: Other classes' maps used for the member threshold (a seeded subsample beyond).
MAX_OTHER_MAPS = 5000


@dataclasses.dataclass
class Candidate:
    """A class's best candidate region.

    Attributes:
        target: the class.
        cells: ``(y0, x0, y1, x1)`` in audit cells, end exclusive.
        source: the mean it came from (``class mean`` or ``cluster N``).
        excess: the class's mean mass in the box minus the other classes'.
        box_mass: each sampled map's mass in the box.
        threshold: the member threshold on ``box_mass``.
        members: indices of the member maps in the class's sample.
        member_share: members / maps in the sample.
    """

    target: int
    cells: tuple
    source: str
    excess: float
    box_mass: np.ndarray
    threshold: float
    members: np.ndarray
    member_share: float


def _box_sums(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """The sum of ``values`` over every ``height x width`` box, ``[rows - height + 1, columns - width + 1]``."""
    integral = np.zeros((values.shape[0] + 1, values.shape[1] + 1))
    integral[1:, 1:] = values.cumsum(axis=0).cumsum(axis=1)
    return (integral[height:, width:] - integral[:-height, width:] - integral[height:, :-width]
            + integral[:-height, :-width])


def best_box(focus: np.ndarray, others: np.ndarray, max_side: float = MAX_BOX_SIDE) -> tuple[tuple, float]:
    """The compact box where ``focus`` has the most mass beyond ``others``.

    Args:
        focus: a mean unit-mass map ``[rows, columns]`` (a class's or a cluster's).
        others: the other classes' mean map, same shape.
        max_side: the longest box side, as a share of the longer map side.

    Returns:
        ``((y0, x0, y1, x1), excess)`` in cells, end exclusive: the smallest
        box holding :data:`EXCESS_KEPT` of the largest excess.
    """
    rows, columns = focus.shape
    difference = np.asarray(focus, np.float64) - np.asarray(others, np.float64)
    longest = max(1, int(round(max_side * max(rows, columns))))
    best = []  # (excess, area, box) of the best position of each size
    for side in range(1, longest + 1):
        height, width = min(side, rows), min(side, columns)
        sums = _box_sums(difference, height, width)
        y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
        best.append((float(sums[y, x]), height * width, (int(y), int(x), int(y) + height, int(x) + width)))
    top = max(excess for excess, _, _ in best)
    if top <= 0:
        return best[0][2], top
    excess, _, box = min((entry for entry in best if entry[0] >= EXCESS_KEPT * top), key=lambda entry: entry[1])
    return box, excess


def box_mass(maps: np.ndarray, cells: tuple) -> np.ndarray:
    """Each map's mass inside ``cells`` (``[n, rows, columns]`` → ``[n]``)."""
    y0, x0, y1, x1 = cells
    return np.asarray(maps, np.float64)[:, y0:y1, x0:x1].sum(axis=(1, 2))


def find_candidate(target: int, class_mean: np.ndarray, others_mean: np.ndarray, cluster_means: list,
                   class_maps: np.ndarray, other_maps: np.ndarray, max_side: float = MAX_BOX_SIDE) -> Candidate:
    """The class's best candidate region (see the module docstring).

    Args:
        target: the class.
        class_mean: its mean unit-mass map (all its maps, from the aggregates).
        others_mean: the other classes' mean map, weighted by their counts.
        cluster_means: ``[(name, share, mean map)]`` of its strategy clusters.
        class_maps: its sampled maps ``[n, rows, columns]``.
        other_maps: sampled maps of the other classes ``[m, rows, columns]``.
        max_side: the longest box side, as a share of the longer map side.

    Returns:
        The :class:`Candidate` with the largest member share.
    """
    focuses = [("class mean", class_mean)] + [(name, mean) for name, share, mean in cluster_means
                                              if share >= MIN_CLUSTER_SHARE]
    area = class_mean.shape[0] * class_mean.shape[1]
    found = None
    for source, focus in focuses:
        cells, excess = best_box(focus, others_mean, max_side)
        box_share = (cells[2] - cells[0]) * (cells[3] - cells[1]) / area
        others_in_box = box_mass(other_maps, cells)
        threshold = max(float(np.quantile(others_in_box, OTHERS_QUANTILE)) if len(others_in_box) else 0.0,
                        MIN_CONCENTRATION * box_share)
        inside = box_mass(class_maps, cells)
        members = np.flatnonzero(inside > threshold)
        share = len(members) / max(1, len(class_maps))
        candidate = Candidate(target=target, cells=cells, source=source, excess=excess, box_mass=inside,
                              threshold=threshold, members=members, member_share=share)
        if found is None or (share, excess) > (found.member_share, found.excess):
            found = candidate
    return found


def box_iou(first, second) -> float:
    """Intersection over union of two ``(y0, x0, y1, x1)`` boxes (0 when either is empty)."""
    height = min(first[2], second[2]) - max(first[0], second[0])
    width = min(first[3], second[3]) - max(first[1], second[1])
    inter = max(0, height) * max(0, width)
    union = ((first[2] - first[0]) * (first[3] - first[1]) + (second[2] - second[0]) * (second[3] - second[1])
             - inter)
    return inter / union if union > 0 else 0.0
