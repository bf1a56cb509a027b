"""Reduced-precision compute: speed and map fidelity against float32, same N, seed and images.

For each model, the engine runs at ``float32``, ``bfloat16`` and ``float16``
(a mixed-precision clone of the model; noise, sums and maps stay float32) on
the same images and keys, so the noise is identical and any difference comes
from the reduced compute dtype. Reported per precision: the median time of
``--repeats`` warm calls (the first, compiling, call excluded), images/s, the
speed ratio to float32, and the Spearman rank correlation of each map with its
float32 map (median, 10th percentile and minimum over images), plus how often
the explained class is the same.

Models: ``demo`` (the demo CNN, trained: ``python -m pipelines.demo --out
demo_data`` first; its held-out images) and any ``keras.applications`` name
with random weights (random images in [-1, 1]).

Example (from the repository root)::

    python benchmarks/precision.py --models demo,ResNet50 --samples 20 --batch 4 \\
        --images 16 --repeats 3 --out precision.json --markdown precision.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from pipelines.demo import demo  # noqa: E402
from transforms.engine.precision import PRECISIONS  # noqa: E402
from transforms.engine.statistics import rank_correlation  # noqa: E402
from transforms.engine.smoothgrad import SmoothGrad  # noqa: E402


def load(name: str, count: int, data_dir: str):
    """(model, images [count, H, W, C] preprocessed, keys) for a model name."""
    if name == "demo":
        model = keras.saving.load_model(os.path.join(data_dir, demo.MODEL_FILENAME), compile=False)
        split = demo.load_split(data_dir, "test")
        images = demo.preprocess(split["image"][:count])
        return model, images, [f"demo-{index}" for index in range(len(images))]
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None)
    size = model.input_shape[1:]
    images = np.random.default_rng(0).uniform(-1.0, 1.0, (count,) + tuple(size)).astype(np.float32)
    return model, images, [f"{name}-{index}" for index in range(count)]


def measure(model, images, keys, precision: str, args) -> dict:
    """Maps of all images and the median warm time of one batch."""
    engine = SmoothGrad(model, samples=args.samples, noise=args.noise, batch_size=args.batch, jit=args.jit,
                        seed=0, precision=precision)
    batch = slice(0, args.batch)
    engine(images[batch], keys[batch])  # trace and compile, untimed
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        engine(images[batch], keys[batch])
        seconds.append(time.perf_counter() - started)
    result = engine(images, keys)
    return {"maps": result.maps, "targets": result.targets, "seconds": statistics.median(seconds),
            "jit_used": engine.jit_used}


def compare(name: str, args) -> list[dict]:
    """One row per precision for one model."""
    model, images, keys = load(name, args.images, args.data)
    runs = {precision: measure(model, images, keys, precision, args) for precision in PRECISIONS}
    reference = runs["float32"]
    rows = []
    for precision, run in runs.items():
        correlations = np.array([rank_correlation(a, b) for a, b in zip(run["maps"], reference["maps"])])
        rows.append({
            "model": name, "precision": precision, "jit_used": run["jit_used"],
            "images_per_s": round(args.batch / run["seconds"], 3),
            "speed_vs_float32": round(reference["seconds"] / run["seconds"], 2),
            "rank_corr_median": round(float(np.nanmedian(correlations)), 4),
            "rank_corr_p10": round(float(np.nanpercentile(correlations, 10)), 4),
            "rank_corr_min": round(float(np.nanmin(correlations)), 4),
            "same_target": round(float(np.mean(run["targets"] == reference["targets"])), 3),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(report: dict) -> str:
    """The report as a Markdown table with its command and environment."""
    lines = [f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}; TensorFlow {report['tensorflow']}, Keras {report['keras']}; "
             f"{report['date']}. N={report['samples']}, batch {report['batch']}, σ {report['noise']} absolute, "
             f"{report['images']} images per model.", "",
             "| model | precision | jit | images/s | × float32 | rank corr. median | p10 | min | same target |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        lines.append(f"| {row['model']} | {row['precision']} | {row['jit_used']} | {row['images_per_s']} | "
                     f"{row['speed_vs_float32']} | {row['rank_corr_median']} | {row['rank_corr_p10']} | "
                     f"{row['rank_corr_min']} | {row['same_target']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    """Runs the comparison; prints one JSON line per row; writes JSON and Markdown when asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,ResNet50")
    parser.add_argument("--data", default="demo_data", help="the demo folder (for the demo model)")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jit", default="auto")
    parser.add_argument("--out")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    report = {"command": " ".join(["python", "benchmarks/precision.py"] + sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
              "tensorflow": tf.__version__, "keras": keras.__version__, "samples": args.samples,
              "batch": args.batch, "noise": args.noise, "images": args.images,
              "rows": [row for name in args.models.split(",") for row in compare(name, args)]}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
