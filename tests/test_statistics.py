"""Per-map statistics on hand-made maps whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transforms.engine.statistics import STATISTICS, border_frame, map_statistics


def test_a_uniform_map():
    figures = map_statistics(np.full((10, 20), 3.0))
    assert figures["entropy"] == pytest.approx(1.0)
    assert figures["gini"] == pytest.approx(0.0, abs=1e-12)
    assert figures["com_y"] == pytest.approx(0.5) and figures["com_x"] == pytest.approx(0.5)
    assert figures["peak_y"] == pytest.approx(0.05) and figures["peak_x"] == pytest.approx(0.025)  # first pixel
    frame = border_frame(10, 20)  # 1 row and 2 columns on each side
    assert frame.sum() == 200 - 8 * 16
    assert figures["border_mass"] == pytest.approx(frame.mean())


def test_a_single_pixel_map():
    saliency = np.zeros((10, 10))
    saliency[2, 7] = -4.0  # the magnitude counts
    figures = map_statistics(saliency)
    assert figures["entropy"] == pytest.approx(0.0, abs=1e-12)
    assert figures["gini"] == pytest.approx(0.99)  # (n - 1) / n for n = 100 pixels
    assert (figures["com_y"], figures["com_x"]) == pytest.approx((0.25, 0.75))
    assert (figures["peak_y"], figures["peak_x"]) == pytest.approx((0.25, 0.75))
    assert figures["border_mass"] == 0.0
    saliency[2, 7], saliency[0, 5] = 0.0, 1.0
    assert map_statistics(saliency)["border_mass"] == 1.0


def test_two_halves_and_channels():
    saliency = np.zeros((4, 4, 3))
    saliency[:, :2, 0] = 1.0  # left half, one channel: mass summed over channels
    figures = map_statistics(saliency)
    assert figures["entropy"] == pytest.approx(math.log(8) / math.log(16))
    assert figures["gini"] == pytest.approx(0.5)
    assert (figures["com_y"], figures["com_x"]) == pytest.approx((0.5, 0.25))
    assert 0.0 <= figures["border_mass"] <= 1.0


@pytest.mark.parametrize("saliency", [np.zeros((5, 5)), np.full((5, 5), np.nan)])
def test_a_map_without_mass_has_no_statistics(saliency):
    assert map_statistics(saliency) == dict.fromkeys(STATISTICS)


def test_statistics_stay_in_range_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(50):
        figures = map_statistics(rng.normal(size=(rng.integers(1, 30), rng.integers(1, 30))) ** 3)
        assert all(0.0 <= figures[name] <= 1.0 for name in STATISTICS), figures


def test_rank_correlation_averages_tied_ranks_as_spearman_does():
    import pandas as pd

    from transforms.engine.statistics import average_ranks, rank_correlation

    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 0.0])), [2.5, 1.0, 2.5, 0.0])
    rng = np.random.default_rng(0)
    # Maps with large zero regions (ties), as ReLU networks give.
    first = np.where(rng.random((16, 16)) < 0.6, 0.0, rng.random((16, 16)))
    second = np.where(rng.random((16, 16)) < 0.6, 0.0, first + 0.3 * rng.random((16, 16)))
    # Spearman = Pearson of pandas' average ranks (pandas' own method="spearman" needs scipy)
    expected = pd.Series(first.ravel()).rank().corr(pd.Series(second.ravel()).rank())
    assert rank_correlation(first, second) == pytest.approx(expected, abs=1e-12)
    assert rank_correlation(first, first * 2 + 1) == pytest.approx(1.0)
    assert rank_correlation(first, -first) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation(first, np.ones_like(first)))
    with pytest.raises(ValueError, match="differ in size"):
        rank_correlation(first, first[:4])


def test_split_half_reliability_is_spearman_pair_by_pair_with_and_without_ties():
    import pandas as pd

    from transforms.engine.statistics import split_half_reliability

    rng = np.random.default_rng(3)
    even = rng.random((3, 2, 12, 12)).astype(np.float32)  # no ties: the fast path
    odd = (even + 0.5 * rng.random(even.shape)).astype(np.float32)
    even[1] = np.where(rng.random((2, 12, 12)) < 0.5, 0.0, even[1])  # large tied zero regions
    odd[1, 1] = np.round(odd[1, 1] * 3)  # a few large tie groups
    even[2, 0] = 0.25  # constant: no ranking
    got = split_half_reliability(even, odd)
    assert got.dtype == np.float32 and got.shape == (3, 2)
    for index in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1)]:
        expected = pd.Series(even[index].ravel()).rank().corr(pd.Series(odd[index].ravel()).rank())
        assert got[index] == pytest.approx(expected, abs=1e-6), index
    assert np.isnan(got[2, 0])
