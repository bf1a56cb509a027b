"""What the split-half reliability costs: the engine with and without its two half-map states.

For each model, in one process, the same explainer settings are built twice
(``reliability=True`` and ``False``) and called in turn, A B A B ..., on the
same random images, so drift of the machine's speed hits both alike. Printed:
each call's seconds, the medians, and their ratio (with / without). The maps
of the two are compared too (they must be identical: the halves are extra
states beside the unchanged one).

Example (from the repository root)::

    python benchmarks/reliability.py --models demo,ResNet50 --samples 20 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import keras  # noqa: E402

from transforms.engine.smoothgrad import SmoothGrad  # noqa: E402

CASES = {  # name: (how to build the model, input shape, batch, images per call)
    "demo": (lambda: keras.saving.load_model("demo_data/model.keras"), (64, 64, 3), 16, 64),
    "ResNet50": (lambda: keras.applications.ResNet50(weights=None), (224, 224, 3), 4, 8),
}


def measure(name: str, samples: int, repeats: int) -> dict:
    """Paired timings of one model with and without the half-map states."""
    build, shape, batch, count = CASES[name]
    model = build()
    images = np.random.default_rng(0).normal(size=(count,) + shape).astype(np.float32)
    keys = [f"k{index}" for index in range(count)]
    engines = {flag: SmoothGrad(model, samples=samples, noise=0.1, batch_size=batch, jit="auto", reliability=flag)
               for flag in (True, False)}
    outputs = {flag: engine(images, keys) for flag, engine in engines.items()}  # warm-up: trace and compile
    seconds = {True: [], False: []}
    for _ in range(repeats):
        for flag, engine in engines.items():
            start = time.perf_counter()
            engine(images, keys)
            seconds[flag].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(seconds[True], seconds[False])]
    return {
        "model": name, "samples": samples, "batch": batch, "images": count, "jit": engines[True].jit_used,
        "chunk": engines[True].chunk, "seconds_with": seconds[True], "seconds_without": seconds[False],
        "median_ratio_with_over_without": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "maps_identical": bool(np.array_equal(outputs[True].maps, outputs[False].maps)),
        "reliability_median": float(np.nanmedian(outputs[True].reliability)),
    }


def main() -> None:
    """Runs the cases named on the command line and prints one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,ResNet50", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name in args.models.split(","):
        print(json.dumps(measure(name, args.samples, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
