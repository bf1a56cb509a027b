"""What a gradient costs in ``samples: auto`` against a fixed N: the price of the stages.

``samples: auto`` computes fewer gradients, but each image goes through more
engine calls (one per stage), each stage's last batch is padded, the running
sums travel between stages and the split-half reliability is computed after
every stage. This measures, in one process, the same images explained by an
adaptive engine and by a fixed-N engine, called in turn (A B A B ...), and
prints per call: seconds, the gradients used (the sum of ``samples_used``) and
the gradients computed (padding included: each stage runs whole batches), and
the seconds per computed gradient of each, whose ratio is the stages' overhead.

Example (from the repository root; the demo needs ``python -m pipelines.demo --out demo_data``)::

    python benchmarks/adaptive_cost.py --models demo,ResNet50 --fixed 20 --repeats 3
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
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import keras  # noqa: E402

from transforms.engine.smoothgrad import SmoothGrad  # noqa: E402


def _demo():
    from reliability_calibration import demo_images

    images, keys = demo_images(64)
    return keras.saving.load_model(str(ROOT / "demo_data" / "model.keras")), images, keys, 16, 64


def _resnet50():
    images = np.random.default_rng(0).normal(size=(8, 224, 224, 3)).astype(np.float32)
    return keras.applications.ResNet50(weights=None), images, [f"k{index}" for index in range(8)], 4, 32


CASES = {"demo": _demo, "ResNet50": _resnet50}  # model, images, keys, batch, max_samples


def computed_gradients(samples_used: np.ndarray, boundaries, batch: int) -> int:
    """Image-samples an in-process adaptive call computes: each stage runs whole batches of its unfinished images."""
    total, done = 0, 0
    for boundary in boundaries:
        unfinished = int(np.sum(samples_used >= boundary))
        if not unfinished:
            break
        total += -(-unfinished // batch) * batch * (boundary - done)
        done = boundary
    return total


def measure(name: str, fixed: int, repeats: int) -> dict:
    """Paired timings of the adaptive and the fixed-N engine on one model's images."""
    model, images, keys, batch, max_samples = CASES[name]()
    common = dict(noise=0.1, batch_size=batch, jit="auto")
    adaptive = SmoothGrad(model, samples="auto", max_samples=max_samples, **common)
    constant = SmoothGrad(model, samples=fixed, **common)
    used = adaptive(images, keys).samples_used  # warm-up: both traced and compiled
    constant(images, keys)
    seconds = {"auto": [], "fixed": []}
    for _ in range(repeats):
        for label, engine in (("auto", adaptive), ("fixed", constant)):
            start = time.perf_counter()
            engine(images, keys)
            seconds[label].append(time.perf_counter() - start)
    computed = {"auto": computed_gradients(used, adaptive.adaptive.boundaries, batch),
                "fixed": -(-len(keys) // batch) * batch * fixed}
    per_gradient = {label: statistics.median(values) / computed[label] for label, values in seconds.items()}
    return {
        "model": name, "images": len(keys), "batch": batch, "jit": adaptive.jit_used, "fixed_samples": fixed,
        "max_samples": max_samples, "samples_used_mean": float(used.mean()),
        "gradients_used": {"auto": int(used.sum()), "fixed": len(keys) * fixed}, "gradients_computed": computed,
        "seconds": seconds, "median_seconds": {label: statistics.median(values) for label, values in seconds.items()},
        "seconds_per_computed_gradient": per_gradient,
        "overhead_auto_over_fixed": per_gradient["auto"] / per_gradient["fixed"],
    }


def main() -> None:
    """Measures every model given and prints one JSON object per model, then a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,ResNet50")
    parser.add_argument("--fixed", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [measure(name, args.fixed, args.repeats) for name in args.models.split(",")]
    for row in rows:
        print(json.dumps(row))
    print("\n| model | mean samples_used | gradients used auto / fixed | computed auto / fixed | seconds auto / fixed "
          "(medians) | s per computed gradient, auto / fixed |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        used, computed, median = row["gradients_used"], row["gradients_computed"], row["median_seconds"]
        print(f"| {row['model']} | {row['samples_used_mean']:.1f} | {used['auto']} / {used['fixed']} | "
              f"{computed['auto']} / {computed['fixed']} | {median['auto']:.2f} / {median['fixed']:.2f} | "
              f"{row['overhead_auto_over_fixed']:.2f}× |")


if __name__ == "__main__":
    main()
