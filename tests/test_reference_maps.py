"""SmoothGrad results pinned by a stored fixture: a refactoring must not move them.

``tests/fixtures/reference_maps.npz`` (made by
``tests/fixtures/make_reference_maps.py``) holds a tiny model's weights, three
images and the results of the engine for every variant x reduction and for
settings that exercise targets, relative noise, overhanging and single chunks,
padded batches, sample offsets, seeds, ``logits=False`` and XLA.

On the platform that made the fixture (same TensorFlow version, CPU flags and
machine architecture) the results must be bit-identical. Elsewhere
TensorFlow's CPU kernels may round differently, so the comparison falls back
to ``rtol=1e-5, atol=1e-6`` and says so in its failure message.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.fixtures.make_reference_maps import FIELDS, FIXTURE, build_model, explain, platform_signature


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE, allow_pickle=False) as stored:
        data = {name: stored[name] for name in stored.files}
    weights = [data[f"weight_{index}"] for index in range(int(data["num_weights"]))]
    return data, build_model(weights)


def _settings():
    with np.load(FIXTURE, allow_pickle=False) as stored:
        return json.loads(str(stored["settings"]))


@pytest.mark.parametrize("name", list(_settings()))
def test_maps_match_the_fixture(reference, name):
    data, model = reference
    setting = json.loads(str(data["settings"]))[name]
    assert [str(key) for key in data["keys"]] == ["img-0", "img-1", "img-2"]
    got = explain(model, data["images"], setting)
    made_on, running_on = str(data["platform"]), platform_signature()
    exact = made_on == running_on
    for field in FIELDS:
        expected = data[f"{name}__{field}"]
        assert got[field].dtype == expected.dtype, f"{name}: {field} dtype changed"
        if exact:
            np.testing.assert_array_equal(
                got[field], expected,
                err_msg=f"{name}: {field} is not bit-identical to the fixture (same platform: {running_on})")
        else:
            np.testing.assert_allclose(
                got[field], expected, rtol=1e-5, atol=1e-6,
                err_msg=(f"{name}: {field} differs from the fixture beyond rtol=1e-5, atol=1e-6 "
                         f"(tolerant check: fixture made on {made_on}, running on {running_on})"))
