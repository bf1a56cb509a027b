"""Adaptive samples: explain each image in stages and stop it when its map has converged.

With ``samples="auto"`` the engine does not spend the same number of noisy
samples on every image. Each image is explained in stages whose ends are
:meth:`AdaptiveSamples.boundaries` (by default 8, 12, 16, 20, 24, 28, 32, 40,
48, 56, 64; the step doubles with the count beyond 64): after each stage, the images whose map is estimated to have
converged stop; only the others go on with the next samples of their own noise
sequence. Because the noise of sample ``s`` of an image depends only on (seed,
key, s), an image stopped after n samples has exactly the map a fixed
``samples=n`` run gives it: stopping early changes nothing but the count.

**The estimate.** After n samples the engine has, besides the map, the map of
the even-numbered samples and the map of the odd-numbered ones; their Spearman
rank correlation r, with the ties of each half broken in a fixed pseudo-random
order (:func:`transforms.engine.statistics.stopping_correlation`: pixels no
sample reached are zero in both halves and must not count as agreement), is
the map's split-half reliability. By the Spearman–Brown
formula the n-sample map's reliability is 2r / (1 + r), and its correlation
with the converged (infinite-sample) map is the square root of that:
``estimate = sqrt(2r / (1 + r))`` (:func:`estimate`). A map stops when its
estimate reaches :meth:`AdaptiveSamples.threshold`: the target plus a margin
that shrinks as 1/n, because r from a few samples is noisy (two half-maps of
four samples each at n = 8) and a premature stop cannot be undone.

**This module is the rule and the carried state**, without TensorFlow: the
engine (:class:`transforms.smoothgrad.SmoothGrad`) runs the stages, in process
or as Beam stages (:mod:`transforms.explain`), and hands each unfinished image
on as a :class:`Partial`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from transforms.engine.options import bad_option

#: Defaults of the ``samples: auto`` settings.
DEFAULT_TARGET = 0.95
DEFAULT_MIN_SAMPLES = 8
DEFAULT_MAX_SAMPLES = 64

#: The stopping margin is ``MARGIN / n`` above the target (fitted on the seven families of the model
#: zoo, each also left out in turn: see docs/adaptive-samples.md).
MARGIN = 0.31


def estimate(reliability) -> np.ndarray:
    """The estimated rank correlation of a map with its converged map, from its split-half reliability r.

    ``sqrt(2r / (1 + r))`` for r > 0 (Spearman–Brown, then the square root);
    0 for r <= 0; NaN stays NaN (a constant half-map: not measurable).

    Example:
        >>> round(float(estimate(0.9)), 4)
        0.9733
    """
    r = np.asarray(reliability, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.sqrt(np.clip(2.0 * r / (1.0 + r), 0.0, 1.0))
    return np.where(np.isnan(r), np.nan, np.where(r > 0, value, 0.0))


def stage_boundaries(min_samples: int, max_samples: int) -> tuple[int, ...]:
    """The sample counts at which images may stop.

    ``min_samples``; then every 4 samples up to 32, every 8 up to 64, every 16
    up to 128, and so on (the step doubles each time the count does, so a large
    ``max_samples`` adds only four stages per doubling); then ``max_samples``.
    Every step after the first stage is a multiple of 4 except possibly the
    last one, which ends at ``max_samples``.

    Example:
        >>> stage_boundaries(8, 64)
        (8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64)
        >>> stage_boundaries(10, 45)
        (10, 12, 16, 20, 24, 28, 32, 40, 45)
        >>> stage_boundaries(8, 160)[-7:]
        (56, 64, 80, 96, 112, 128, 160)
    """
    grid, step, n = [], 4, 4
    while n < max_samples:
        grid.append(n)
        if n >= 32 and n & (n - 1) == 0:  # a power of two from 32 on: the step doubles
            step = n // 4
        n += step
    return (min_samples,) + tuple(n for n in grid if min_samples < n < max_samples) + \
        ((max_samples,) if max_samples > min_samples else ())


@dataclasses.dataclass(frozen=True)
class AdaptiveSamples:
    """The ``samples: auto`` settings and the stopping rule.

    Attributes:
        target: the estimated rank correlation of each map with its converged
            map at which the image stops (``target_reliability``), in (0, 1).
        min_samples: the samples of the first stage (>= 2: the estimate needs
            two halves).
        max_samples: the most samples an image gets (>= ``min_samples``).
    """

    target: float = DEFAULT_TARGET
    min_samples: int = DEFAULT_MIN_SAMPLES
    max_samples: int = DEFAULT_MAX_SAMPLES

    def __post_init__(self):
        target = self.target
        if isinstance(target, bool) or not isinstance(target, (int, float, np.integer, np.floating)) \
                or not math.isfinite(target) or not 0 < target < 1:
            raise bad_option("target_reliability", "a number between 0 and 1 (exclusive)", target)
        for name, value, minimum in (("min_samples", self.min_samples, 2),
                                     ("max_samples", self.max_samples, self.min_samples)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise bad_option(name, f"a whole number >= {minimum}" +
                                 (" (min_samples)" if name == "max_samples" else ""), value)
        object.__setattr__(self, "target", float(target))
        object.__setattr__(self, "min_samples", int(self.min_samples))
        object.__setattr__(self, "max_samples", int(self.max_samples))

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The sample count at the end of each stage (:func:`stage_boundaries`)."""
        return stage_boundaries(self.min_samples, self.max_samples)

    @property
    def increments(self) -> tuple[int, ...]:
        """The samples each stage adds (the first stage's are ``min_samples``)."""
        ends = self.boundaries
        return (ends[0],) + tuple(b - a for a, b in zip(ends, ends[1:]))

    def continue_gcd(self) -> int:
        """The greatest common divisor of the increments after the first stage (0 with one stage)."""
        return math.gcd(*self.increments[1:]) if len(self.increments) > 1 else 0

    def threshold(self, samples: int) -> float:
        """The estimate a map needs after ``samples`` samples to stop: ``target + MARGIN / samples``, below 1."""
        return min(self.target + MARGIN / samples, 0.9999)

    def converged(self, reliability, samples: int) -> np.ndarray:
        """Per image, whether every map of it reached :meth:`threshold` (``reliability`` ``[B]`` or ``[B, K]``)."""
        values = estimate(reliability)
        values = values.reshape(values.shape[0], -1)
        with np.errstate(invalid="ignore"):
            return np.all(values >= self.threshold(samples), axis=1)

    def next_boundary(self, samples: int) -> int | None:
        """The end of the stage after ``samples`` samples, or None when ``samples`` is the last."""
        for boundary in self.boundaries:
            if boundary > samples:
                return boundary
        return None

    def as_dict(self) -> dict:
        """The settings as the manifest records them."""
        return {"target_reliability": self.target, "min_samples": self.min_samples,
                "max_samples": self.max_samples, "stages": list(self.boundaries)}


@dataclasses.dataclass
class Partial:
    """One image between stages: what the engine carries to the next stage (numpy; picklable).

    Attributes:
        state: the running sums of the variant for all samples, the even ones
            and the odd ones, flattened (each leaf without the batch axis; a
            variant's scalar count is a 0-d array).
        samples: the samples folded in so far.
        targets, target_ranks, scores: ``[K]``, from the first stage (later
            stages explain the same classes).
        predicted: the clean top-1 class.
        noise_sigma: the σ of the image.
        maps: ``[K, ...]`` the map after ``samples`` samples.
        reliability: ``[K]`` the split-half reliability after ``samples`` samples
            (the ``reliability`` column).
        stopping: ``[K]`` the split-half r the stopping rule reads
            (:func:`transforms.engine.statistics.stopping_reliability`).
        done: whether the image stops here (converged, or the last stage).
    """

    state: tuple
    samples: int
    targets: np.ndarray
    target_ranks: np.ndarray
    scores: np.ndarray
    predicted: int
    noise_sigma: float
    maps: np.ndarray
    reliability: np.ndarray
    stopping: np.ndarray | None = None
    done: bool = False

    @property
    def nbytes(self) -> int:
        """The bytes of its arrays (what travels with the image between stages)."""
        return sum(leaf.nbytes for leaf in self.state) + self.maps.nbytes


def stack_states(partials: list[Partial], pad: int) -> list[np.ndarray]:
    """The batch state of ``partials``, zero-padded by ``pad`` images; scalar leaves (counts) must agree."""
    leaves = []
    for position, first in enumerate(partials[0].state):
        values = [partial.state[position] for partial in partials]
        if first.ndim == 0:
            if any(value != first for value in values):
                raise ValueError("Images of one stage batch must have folded in the same samples.")
            leaves.append(first)
        else:
            stacked = np.stack(values)
            if pad:
                stacked = np.concatenate([stacked, np.zeros((pad,) + first.shape, first.dtype)])
            leaves.append(stacked)
    return leaves


def split_states(leaves: list[np.ndarray], count: int) -> list[tuple]:
    """Per image, the state leaves of a batch state (the inverse of :func:`stack_states`)."""
    return [tuple(leaf if leaf.ndim == 0 else leaf[position] for leaf in leaves) for position in range(count)]
