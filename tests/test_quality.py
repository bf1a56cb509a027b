"""Quality figures and sanity checks on hand-made maps and tiny models."""

from __future__ import annotations

import numpy as np
import pytest

from tests import helpers
from transforms.rows import postprocess
from transforms.explain import sanity


def test_mass_in_mask_and_pointing_on_hand_made_maps():
    saliency = np.zeros((4, 4), np.float32)
    saliency[0, 0], saliency[3, 3], saliency[1, 2] = 3.0, 1.0, -4.0  # magnitude counts
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[3, 3] = True
    inside, hit = postprocess.mask_figures(saliency, mask)
    assert inside == pytest.approx(4.0 / 8.0) and hit is False  # the peak |-4| is outside
    mask[1, 2] = True
    assert postprocess.mask_figures(saliency, mask) == (pytest.approx(1.0), True)
    channels = np.stack([saliency, saliency], axis=-1)
    assert postprocess.mask_figures(channels, mask)[0] == pytest.approx(1.0)
    assert postprocess.mask_figures(saliency, np.zeros((4, 4), bool)) == (None, None)
    assert postprocess.mask_figures(np.zeros((4, 4)), mask) == (None, None)
    with pytest.raises(ValueError, match="differ in size"):
        postprocess.mask_figures(saliency, np.zeros((2, 2), bool))


def test_normalize_and_downsample():
    saliency = np.array([[1.0, 3.0], [-1.0, 5.0]], np.float32)
    np.testing.assert_allclose(postprocess.normalize(saliency, "minmax"), [[1 / 3, 2 / 3], [0, 1]])
    np.testing.assert_allclose(postprocess.normalize(saliency, "abs_minmax"), [[0, 0.5], [0, 1]])
    np.testing.assert_allclose(postprocess.normalize(saliency, "percentile:100"), np.abs(saliency) / 5)
    assert not postprocess.normalize(np.ones((2, 2)), "minmax").any()
    assert postprocess.downsample(saliency, 2).tolist() == [[2.0]]
    big = np.arange(36, dtype=np.float32).reshape(6, 6)
    assert postprocess.downsample(big, 4).shape == (1, 1)  # partial blocks dropped
    with pytest.raises(ValueError):
        postprocess.parse_normalize("percentile:0")


def test_rank_correlation_known_values():
    values = np.arange(10.0)
    assert sanity.rank_correlation(values, values * 3 + 1) == pytest.approx(1.0)
    assert sanity.rank_correlation(values, -values) == pytest.approx(-1.0)
    assert sanity.rank_correlation(values, values ** 3) == pytest.approx(1.0)  # monotone: ranks equal
    assert np.isnan(sanity.rank_correlation(values, np.ones(10)))


def test_convergence_is_perfect_without_noise_and_lower_with_it():
    model = helpers.tiny_cnn(16, 3)
    images = helpers.random_images(3, 16).astype(np.float32) / 127.5 - 1.0
    keys = ["a", "b", "c"]
    exact = sanity.convergence(model, images, keys, samples=4, noise=0.0, batch_size=3, jit="graph")
    assert exact["samples_per_half"] == 2
    assert exact["split_half_rank_correlation"] == pytest.approx(1.0)
    noisy = sanity.convergence(model, images, keys, samples=4, noise=1.0, batch_size=3, jit="graph")
    assert noisy["split_half_rank_correlation"] < 0.999


def test_randomisation_cascade_changes_the_maps():
    model = helpers.tiny_cnn(16, 3)
    images = helpers.random_images(3, 16).astype(np.float32) / 127.5 - 1.0
    weights_before = [weight.copy() for weight in model.get_weights()]
    figures = sanity.randomisation(model, images, ["a", "b", "c"], samples=2, noise=0.05, batch_size=3,
                                   jit="graph")
    assert figures["layers_total"] == 2
    assert [step["layers_randomised"] for step in figures["cascade"]] == [1, 2]
    assert figures["cascade"][0]["down_to"] == "predictions"
    assert all(step["rank_correlation"] < 0.9 for step in figures["cascade"])
    for before, after in zip(weights_before, model.get_weights()):  # the caller's model is untouched
        np.testing.assert_array_equal(before, after)
