"""How well a map's split-half reliability predicts its agreement with the converged map.

For each test image of the demo (``demo_data/``, made by ``python -m
pipelines.demo``), in one process:

1. the reference map: the mean over ``--reference`` noisy samples (default 512);
2. for each N in ``--samples`` (default 8, 16, 32, 64): the N-sample map and its
   split-half reliability r (the engine's ``reliability``: Spearman rank
   correlation of the even- and odd-sample half-maps);
3. the agreement of the N-sample map with the reference (Spearman), and the
   Spearman–Brown prediction of it from r: ``sqrt(2r / (1 + r))`` (the
   reliability of the full N-map is ``2r / (1 + r)``; its correlation with an
   infinite-sample map is the square root of that).

Printed per N: the share of maps whose agreement reaches ``--target``
(default 0.95), the mean and spread of prediction − agreement, and for a rule
"stop when the prediction reaches the target (plus a margin)" the share of
maps it would stop whose agreement is in fact below the target (false stops).
That table is what a stopping rule for adaptive samples is calibrated on.

Example (from the repository root)::

    python benchmarks/reliability_calibration.py --images 48 --reference 512 --samples 8,16,32,64
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from transforms.engine.smoothgrad import SmoothGrad  # noqa: E402
from transforms.engine.statistics import rank_correlation  # noqa: E402


def demo_images(count: int):
    """The first ``count`` demo test images, preprocessed as the demo model expects, with their keys."""
    import tensorflow as tf

    paths = sorted(glob.glob(str(ROOT / "demo_data" / "test-*.tfrecord")))
    if not paths:
        sys.exit("demo_data/ is missing: run python -m pipelines.demo --out demo_data first")
    images, keys = [], []
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string), "image/id": tf.io.FixedLenFeature([], tf.string)}
    for data in tf.data.TFRecordDataset(paths).take(count).as_numpy_iterator():
        parsed = tf.io.parse_single_example(data, spec)
        pixels = tf.io.decode_png(parsed["image/encoded"], channels=3).numpy().astype(np.float32)
        images.append(pixels / 127.5 - 1.0)
        keys.append(parsed["image/id"].numpy().decode())
    return np.stack(images), keys


def main() -> None:
    """Measures and prints the calibration table as JSON lines."""
    import keras

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--reference", type=int, default=512)
    parser.add_argument("--samples", default="8,16,32,64")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--margins", default="0,0.01,0.02,0.03")
    args = parser.parse_args()
    model = keras.saving.load_model(str(ROOT / "demo_data" / "model.keras"))
    images, keys = demo_images(args.images)
    common = dict(noise=args.noise, batch_size=16, jit="graph")
    reference = SmoothGrad(model, samples=args.reference, reliability=False, **common)(images, keys).maps
    margins = [float(value) for value in args.margins.split(",")]
    for samples in (int(value) for value in args.samples.split(",")):
        result = SmoothGrad(model, samples=samples, **common)(images, keys)
        agreement = np.array([rank_correlation(a, b) for a, b in zip(result.maps, reference)])
        r = np.clip(result.reliability.astype(np.float64), 0.0, 1.0)
        predicted = np.sqrt(2 * r / (1 + r))
        error = predicted - agreement
        row = {"samples": samples, "maps": len(keys), "share_reaching_target": float(np.mean(agreement >= args.target)),
               "agreement_median": float(np.median(agreement)), "reliability_median": float(np.median(r)),
               "prediction_minus_agreement_mean": float(error.mean()),
               "prediction_minus_agreement_p90": float(np.quantile(error, 0.9)),
               "rules": []}
        for margin in margins:
            stopped = predicted >= args.target + margin
            false = stopped & (agreement < args.target)
            row["rules"].append({"margin": margin, "share_stopped": float(stopped.mean()),
                                 "false_stops_of_stopped": float(false.sum() / stopped.sum()) if stopped.any() else None})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
