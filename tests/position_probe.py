"""Explains the same images at every position of a batch and reports, per column, how far the results move.

Run in a subprocess by ``tests/test_cpu_kernels.py``, under the environment
that chooses the kernel library (``TF_ENABLE_ONEDNN_OPTS``) and, optionally,
caps on the vector extensions the kernels use; prints one JSON object:
``{"kernels": ..., "device": ..., "settings": {name: {column: {"identical": bool, "max_ulp": int}}}}``.
"""

from __future__ import annotations

import json
import sys

import numpy as np

import transforms  # noqa: F401 - chooses the kernel library before TensorFlow is imported
from transforms.engine.device import cpu_kernels_in_effect, current_device_kind

import tensorflow as tf  # noqa: E402

from tests import helpers  # noqa: E402
from transforms.smoothgrad import SmoothGrad  # noqa: E402

SETTINGS = {
    "N=3": dict(samples=3, noise=0.2),
    "N=20": dict(samples=20, noise=0.1),
    "topk:2": dict(samples=4, noise=0.2, target="topk:2"),
    "auto": dict(samples="auto", noise=0.2, min_samples=4, max_samples=12),
}
COLUMNS = ("maps", "scores", "targets", "target_ranks", "predicted", "noise_sigma", "reliability", "samples_used")
BATCH = 4


def main(images_count: int = 12) -> dict:
    images = helpers.random_images(images_count, size=16, seed=7).astype(np.float32) / 127.5 - 1
    keys = [f"img-{index}" for index in range(images_count)]
    model = helpers.tiny_cnn(size=16, classes=3)
    report = {"kernels": cpu_kernels_in_effect(), "device": current_device_kind(), "settings": {}}
    for name, settings in SETTINGS.items():
        engine = SmoothGrad(model, batch_size=BATCH, **settings)
        seen = {column: [[] for _ in range(images_count)] for column in COLUMNS}
        for position in range(BATCH):
            for index in range(images_count):
                others = [(index + 1 + step) % images_count for step in range(BATCH - 1)]
                order = others[:position] + [index] + others[position:]
                result = engine(images[order], [keys[member] for member in order])
                for column in COLUMNS:
                    value = getattr(result, column)
                    if value is not None:
                        seen[column][index].append(np.asarray(value[position]))
        figures = {}
        for column in COLUMNS:
            if not seen[column][0]:
                continue
            identical = all(all(np.array_equal(values[0], other, equal_nan=True) for other in values[1:])
                            for values in seen[column])
            ulp = max(helpers.ulp_distance(values[0], other) for values in seen[column] for other in values[1:]) \
                if np.issubdtype(seen[column][0][0].dtype, np.floating) else (0 if identical else None)
            figures[column] = {"identical": identical, "max_ulp": ulp}
        report["settings"][name] = figures
    return report


if __name__ == "__main__":
    json.dump(main(*(int(arg) for arg in sys.argv[1:])), sys.stdout)
    sys.stdout.write("\n")
