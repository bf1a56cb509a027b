"""Measures the maps of every stage of ``samples: auto`` on the model zoo, for the stopping-rule study.

For each family of ``benchmarks/model_zoo.py`` and its first ``--images`` test
images: the reference map (the mean of ``--reference`` samples, 0 to
reference - 1, as a fixed-N run draws them) and, at every stage boundary of
``samples: auto`` up to ``--max-samples`` (8, 12, ..., 32, 40, ..., 64, 80,
96, 112, 128), the map and its even- and odd-sample half-maps. They come from
the engine's own stages (``begin`` / ``resume`` with no image stopping), so
each stage's map is the one an auto run stopped there keeps (and, to float
rounding, the fixed-N map). The raw arrays go to
``benchmarks/.cache/adaptive_zoo/<family>.npz`` (gitignored) and are reused;
``benchmarks/adaptive_rules.py`` fits and validates stopping rules on them.

Example (from the repository root)::

    python benchmarks/model_zoo.py
    python benchmarks/adaptive_zoo.py --images 64 --reference 512
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "adaptive_zoo"
COMMON = dict(noise=0.1, batch_size=16, jit="graph")


def measure(family: str, images_count: int, reference: int, max_samples: int) -> dict:
    """``maps``, ``even``, ``odd`` ``[images, stages, H, W]``, ``reference`` ``[images, H, W]``, ``stages``, keys."""
    import model_zoo
    import transforms.engine.smoothgrad as smoothgrad_module
    import transforms.engine.stages as stages_module
    from transforms.engine.smoothgrad import SmoothGrad

    model_zoo.ensure(family)
    model, images, keys = model_zoo.load(family, images_count)
    started = time.perf_counter()
    ref = SmoothGrad(model, samples=reference, reliability=False, **COMMON)(images, keys).maps
    engine = SmoothGrad(model, samples="auto", min_samples=8, max_samples=max_samples, **COMMON)
    halves = []  # (even, odd) of each stage batch, in call order

    def recorder(even, odd):
        halves.append((np.array(even[:, 0]), np.array(odd[:, 0])))
        return np.full(even.shape[:2], np.nan, np.float32)

    saved = smoothgrad_module.split_half_reliability, stages_module.split_half_reliability
    smoothgrad_module.split_half_reliability = stages_module.split_half_reliability = recorder
    try:
        per_stage, partials = [], engine.begin(images, keys)
        while True:
            per_stage.append((partials[0].samples, np.stack([p.maps[0] for p in partials]),
                              np.concatenate([h[0] for h in halves]), np.concatenate([h[1] for h in halves])))
            halves.clear()
            if partials[0].samples >= max_samples:
                break
            for partial in partials:
                partial.done = False
            partials = engine.resume(images, keys, partials)
    finally:
        smoothgrad_module.split_half_reliability, stages_module.split_half_reliability = saved
    return {"stages": np.array([s[0] for s in per_stage]), "maps": np.stack([s[1] for s in per_stage], 1),
            "even": np.stack([s[2] for s in per_stage], 1), "odd": np.stack([s[3] for s in per_stage], 1),
            "reference": ref, "keys": np.array(keys), "reference_samples": np.array(reference),
            "seconds": np.array(time.perf_counter() - started)}


def load(family: str, images: int, reference: int, max_samples: int = 128) -> dict:
    """The cached arrays of a family, measured first if missing or made with other settings."""
    path = CACHE / f"{family}.npz"
    if path.exists():
        with np.load(path) as data:
            cached = {name: data[name] for name in data.files}
        if len(cached["keys"]) == images and int(cached["reference_samples"]) == reference \
                and int(cached["stages"][-1]) == max_samples:
            return cached
    arrays = measure(family, images, reference, max_samples)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


def main() -> None:
    import model_zoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(model_zoo.FAMILIES))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--reference", type=int, default=512)
    parser.add_argument("--max-samples", type=int, default=128)
    args = parser.parse_args()
    for family in args.families.split(","):
        data = load(family, args.images, args.reference, args.max_samples)
        print(f"{family}: {len(data['keys'])} images, stages {data['stages'].tolist()}, "
              f"{float(data['seconds']):.0f} s", flush=True)


if __name__ == "__main__":
    main()
