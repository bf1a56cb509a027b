"""What one call of the SmoothGrad engine returns: numpy arrays, one entry per image (and class)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class SmoothGradResult:
    """What one call of :class:`SmoothGrad` returns (numpy arrays).

    Attributes:
        maps: ``[B, H, W]`` (``[B, K, H, W]`` for ``topk:K``; a trailing channel
            axis when ``reduce="none"``), float32, raw (not normalised).
        targets: explained class per map, int32 ``[B]`` (``[B, K]`` for topk).
        target_ranks: rank of each target among the clean scores (0 = top).
        scores: score of each target on the clean input (pre-softmax when
            ``logits=True``), float32, same shape as ``targets``.
        predicted: clean top-1 class, int32 ``[B]``.
        noise_sigma: the σ used for each image, float32 ``[B]``.
        reliability: the split-half reliability of each map (Spearman rank
            correlation of the even- and odd-sample half-maps), float32, same
            shape as ``targets``; NaN where it cannot be measured (N < 2, a
            constant half-map); None when the explainer was built with
            ``reliability=False``.
        samples_used: the noisy samples behind each image's maps, int32
            ``[B]``: ``samples`` for every image, or with ``samples="auto"``
            the stage at which the image stopped.
        stopping: with ``samples="auto"``, the split-half r the stopping rule
            read at ``samples_used`` (ties broken in one half:
            :func:`transforms.engine.statistics.stopping_correlation`), same
            shape as ``targets``; None for a fixed ``samples``.
    """

    maps: np.ndarray
    targets: np.ndarray
    target_ranks: np.ndarray
    scores: np.ndarray
    predicted: np.ndarray
    noise_sigma: np.ndarray
    reliability: np.ndarray | None = None
    samples_used: np.ndarray | None = None
    stopping: np.ndarray | None = None
